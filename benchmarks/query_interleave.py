"""The encoder's lag behind real time while answers are generated: interleaved vs not.

A live clip producer puts one 4-frame clip every ``--clip-s`` wall-clock seconds into the
engine's clip queue (the clip becomes available at its end time, as from a real source) while a
client asks long questions back to back (``--new-tokens`` tokens over the last ``--window-clips``
clips of memory, 4,096 visual tokens, so a prefill takes a second or two). Model: the tiny
vision tower and a 28-layer Qwen2 decoder of width 128 with the model-card dropping.

Lag of a clip = wall clock when its tokens reach memory − the clip's end (includes encode).
The client pauses a random fraction of a clip period before each question, so prefills do not
phase-lock with clip arrivals.

- interleaved: the real ``Engine`` (encode batches go between a query's steps: its prefill
  chunks, then one decode step at a time).
- baseline (same run): ``WholeAnswerEngine``, which runs a whole answer (prefill and every
  decode step) in one device call before the scheduler looks at the clip queue again.

Rounds alternate the two so load from other processes hits both alike. Reported: per-clip lag
mean / p95 / max per condition (and ``engine.stats().lag_s`` sampled every 0.25 s), answers,
their TTFT and latency, and the ratios baseline / interleaved.

    python benchmarks/query_interleave.py [--seconds 30] [--rounds 2] [--new-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

import numpy as np
from _query_common import (
    CLIP_TOKENS,
    DROP_PLAN,
    LiveClips,
    MemoryReplies,
    WholeAnswerEngine,
    ask_engine,
    history_bank,
    machine,
    ratio,
    running,
    scaled_loaded,
    summary,
    warm_up,
    write_result,
)

from model.loader import LoadedModel
from sinks.settings import QuerySettings
from streamer.engine.core import Engine
from streamer.engine.settings import EngineSettings

CONDITIONS = ("interleaved", "baseline")
QUESTION = "Describe everything that happened, step by step, with the times."


async def run_condition(
    condition: str, loaded: LoadedModel, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, Any]:
    bank, now = history_bank(
        loaded, rng, clips=args.window_clips, clip_s=args.clip_s, budget_mb=64.0
    )
    replies = MemoryReplies()
    settings = QuerySettings(max_in_flight=1, max_queued=4, max_new_tokens_limit=512)
    kind = Engine if condition == "interleaved" else WholeAnswerEngine
    engine = kind(loaded, bank, replies, settings, EngineSettings(encode_batch_clips=8))
    camera = LiveClips(engine, loaded, rng, after=now, clip_s=args.clip_s)
    answers: list[dict[str, Any]] = []
    sampled_lag: list[float] = []

    async def client() -> None:
        think = np.random.default_rng(1)
        while True:
            # A random pause of up to one clip period keeps prefills from phase-locking with
            # clip arrivals (answers of equal length would otherwise start at the same phase).
            await asyncio.sleep(float(think.uniform(0.0, args.clip_s)))
            asked = time.time()
            answer = await ask_engine(
                engine,
                replies,
                QUESTION,
                now=asked,
                since=asked - args.window_clips * args.clip_s,
                max_new_tokens=args.new_tokens,
                deadline_s=600.0,
            )
            answers.append(
                {
                    "ttft_s": answer.ttft_s,
                    "latency_s": answer.latency_s,
                    "tokens": answer.tokens,
                    "visual_tokens": answer.frames * 16,
                }
            )

    async def sampler() -> None:
        while True:
            await asyncio.sleep(0.25)
            sampled_lag.append(engine.stats().lag_s)

    async with running(engine):
        tasks = [asyncio.create_task(fn()) for fn in (camera.run, client, sampler)]
        await asyncio.sleep(args.seconds)
        for task in tasks[:2]:  # stop producing and asking; the engine drains what is queued
            task.cancel()
        async with asyncio.timeout(120.0):
            while len(bank.lags) < camera.produced:
                await asyncio.sleep(0.02)
        tasks[2].cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stats = engine.stats()
    lags = bank.lags
    return {
        "condition": condition,
        "clips_produced": camera.produced,
        "clips_encoded_live": len(lags),
        "clips_dropped": camera.queue.drops(),
        "encode_batches": stats.batches,
        "lag_s": summary(lags),
        "stats_lag_s_sampled": summary(sampled_lag),
        "answers": len(answers),
        "answer_ttft_s": summary([a["ttft_s"] for a in answers if a["ttft_s"] is not None]),
        "answer_latency_s": summary([a["latency_s"] for a in answers]),
        "answer_tokens": summary([a["tokens"] for a in answers]),
        "visual_tokens": summary([a["visual_tokens"] for a in answers]),
        "lags": lags,
    }


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One condition's rounds together: per-clip lags pooled, answers counted."""
    lags = [lag for run in runs for lag in run["lags"]]
    latencies = [run["answer_latency_s"]["p50"] for run in runs if run["answers"]]
    ttfts = [run["answer_ttft_s"]["p50"] for run in runs if run["answers"]]
    return {
        "lag_s": summary(lags),
        "stats_lag_max_s": max(run["stats_lag_s_sampled"]["max"] or 0.0 for run in runs),
        "answers": sum(run["answers"] for run in runs),
        "answer_latency_p50_s": float(np.median(latencies)) if latencies else None,
        "answer_ttft_p50_s": float(np.median(ttfts)) if ttfts else None,
        "clips": sum(run["clips_produced"] for run in runs),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    loaded = scaled_loaded(args.hidden, drop=DROP_PLAN)
    warm_up(loaded, args.window_clips * CLIP_TOKENS)
    rng = np.random.default_rng(0)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONDITIONS}
    for round_index in range(args.rounds):
        order = CONDITIONS if round_index % 2 == 0 else CONDITIONS[::-1]
        for condition in order:
            run = await run_condition(condition, loaded, args, rng)
            runs[condition].append(run)
            lag = run["lag_s"]
            print(
                f"  round {round_index} {condition:11s} lag mean {lag['mean']:.2f} s  "
                f"p95 {lag['p95']:.2f} s  max {lag['max']:.2f} s  answers {run['answers']}  "
                f"ttft p50 {run['answer_ttft_s']['p50']} latency p50 "
                f"{run['answer_latency_s']['p50']}",
                flush=True,
            )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128, help="LLM width (real 2B: 1536)")
    parser.add_argument("--seconds", type=float, default=30.0, help="per condition and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both conditions")
    parser.add_argument("--clip-s", type=float, default=1.0, help="a clip every this many s")
    parser.add_argument("--window-clips", type=int, default=64, help="clips each question reads")
    parser.add_argument("--new-tokens", type=int, default=96, help="max_new_tokens per answer")
    args = parser.parse_args()
    started = time.perf_counter()
    runs = asyncio.run(measure(args))
    pools = {c: pooled(runs[c]) for c in CONDITIONS}
    inter, base = pools["interleaved"], pools["baseline"]
    ratios = {
        key: ratio(base["lag_s"][key], inter["lag_s"][key]) for key in ("mean", "p50", "p95", "max")
    }
    for condition in CONDITIONS:
        for run in runs[condition]:
            run.pop("lags")
    result = {
        "figure": "encoder lag behind real time while answering: interleaved vs whole answers",
        "model": {"vision": "tiny (112 px, width 64)", "llm_layers": 28, "hidden": args.hidden},
        "drop_plan": {
            "kind": DROP_PLAN.kind,
            "layers": DROP_PLAN.layers,
            "ratios": DROP_PLAN.ratios,
        },
        "clip_every_s": args.clip_s,
        "window_clips": args.window_clips,
        "window_visual_tokens": args.window_clips * CLIP_TOKENS,
        "max_new_tokens": args.new_tokens,
        "seconds_per_condition_and_round": args.seconds,
        "rounds": args.rounds,
        "pooled": pools,
        "lag_ratio_baseline_vs_interleaved": ratios,
        # what interleaving costs the answers (encode batches and a loop turn between steps)
        "answer_latency_ratio_interleaved_vs_baseline": ratio(
            inter["answer_latency_p50_s"], base["answer_latency_p50_s"]
        ),
        "stats_lag_note": "engine.stats().lag_s is the lag of the newest clip of the last "
        "batch, so it understates how late the older clips of a batch were",
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "machine": machine(),
    }
    path = write_result("query_interleave", result)
    print(f"{'condition':12s} {'lag mean':>8} {'p95':>6} {'max':>6} {'answers':>7} "
          f"{'ttft p50':>8} {'latency p50':>11}")  # fmt: skip
    for condition, pool in pools.items():
        lag = pool["lag_s"]
        print(
            f"{condition:12s} {lag['mean']:8.2f} {lag['p95']:6.2f} {lag['max']:6.2f} "
            f"{pool['answers']:7d} {pool['answer_ttft_p50_s']:8.2f} "
            f"{pool['answer_latency_p50_s']:11.2f}"
        )
    shown = {k: None if v is None else round(v, 2) for k, v in ratios.items()}
    print(f"lag ratio baseline / interleaved: {shown}")
    print(f"wrote {path} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
