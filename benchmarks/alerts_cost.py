"""Device time of standing-query evaluation rounds, with and without prefix sharing, and the
encoder's clip latency while rounds run.

The 2B checkpoint's LLM widths (hidden 1536, 12 query / 2 KV heads, FFN 8960) with fewer layers
and a reduced vocabulary on this CPU (named in the JSON); random weights, float32; the model
card's drop recipe [4, 18] of 28 layers scaled to the depth used. A round is 1, 4 or 16 yes/no
questions over one window ([header, window's visual tokens, question]) scored by
``streamer.engine.scoring.ScoreRound``: shared, the question-independent prefix is computed
once and each question runs its suffix from it; unshared (the baseline, same run), each
question runs a full prefill. ``sharing_ratio`` = shared / unshared device time at 16
(target <= 0.3).

Encoder lag: clips arrive every ``--clip-period`` s; the real ``Scheduler`` (evaluation_share
0.2, encode batches of one clip) decides between encoding (a stand-in workload of
``--encode-ms`` of real matrix products: the vision tower is not run here) and steps of
16-question scoring rounds kept queued back to back, each step one prefill chunk of
``--chunk`` rows. Clip latency = encoded - arrived; p50 and max with rounds vs without
(target: unchanged within noise, i.e. within about one chunk).

    python benchmarks/alerts_cost.py [--layers 4] [--visual 512] [--clips 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.prefill import PrefixCache
from model.synthetic import llm_2b_config, model_card_drop, random_llm
from streamer.engine.feeds import ClipFeeds
from streamer.engine.scheduler import (
    EncodeBatch,
    MemoryState,
    Scheduler,
    SchedulerPolicy,
    ScoreBatch,
)
from streamer.engine.scoring import RoundInput, ScoreRound
from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip

RESULTS = Path(__file__).resolve().parent / "results" / "alerts_cost.json"
HEADER, QUESTION = 14, 24  # system/user header; time message + question + assistant header
YES_NO = (56, 45)  # any two ids: the score's arithmetic, not its meaning, is timed
_MEMORY = MemoryState(known=frozenset({"cam"}), with_tokens=frozenset({"cam"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (real 2B: 28)")
    parser.add_argument("--vocab", type=int, default=16384, help="vocabulary (real: 151936)")
    parser.add_argument(
        "--visual", type=int, default=512, help="window tokens (16 s: 8 clips x 64)"
    )
    parser.add_argument(
        "--round-chunk", type=int, default=2048,
        help="prefill rows per step when timing rounds (engine.prefill_chunk_tokens default)",
    )  # fmt: skip
    parser.add_argument("--chunk", type=int, default=32, help="prefill rows per step (lag run)")
    parser.add_argument("--clips", type=int, default=24, help="clips per encoder-lag run")
    parser.add_argument("--clip-period", type=float, default=0.5, help="seconds between clips")
    parser.add_argument("--encode-ms", type=float, default=120.0, help="encode stand-in, ms")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = llm_2b_config(num_layers=args.layers, vocab_size=args.vocab)
    lm = random_llm(config, seed=0)
    plan = model_card_drop(args.layers)
    generator = torch.Generator().manual_seed(0)
    window = torch.randn(1, HEADER + args.visual, config.hidden_size, generator=generator)
    questions = [
        torch.cat([window, torch.randn(1, QUESTION, config.hidden_size, generator=generator)], 1)
        for _ in range(16)
    ]

    def round_of(
        n: int, shared: bool, cache: PrefixCache | None = None, chunk: int | None = None
    ) -> ScoreRound:
        inputs = [RoundInput(q, HEADER, args.visual) for q in questions[:n]]
        return ScoreRound(lm, inputs, drop=plan, yes_no=YES_NO,
                          chunk_tokens=chunk or args.chunk, cache=cache,
                          key="window" if shared else None)  # fmt: skip

    def device_s(n: int, shared: bool) -> float:
        start = time.perf_counter()
        scoring = round_of(n, shared, chunk=args.round_chunk)
        while scoring.step() is None:
            pass
        return time.perf_counter() - start

    device_s(1, True)  # warm-up
    rounds: dict[str, dict[int, float]] = {"shared": {}, "unshared": {}}
    for n in (1, 4, 16):
        rounds["shared"][n] = device_s(n, True)
        rounds["unshared"][n] = device_s(n, False)
    sharing_ratio = rounds["shared"][16] / rounds["unshared"][16]

    encode = _encode_stand_in(args.encode_ms / 1000.0)
    without = _clip_latencies(args, encode, None)
    with_rounds = _clip_latencies(args, encode, lambda: round_of(16, True, PrefixCache(1 << 32)))
    step_s = _median_step_s(round_of(16, True))

    def summary(latencies: list[float]) -> dict[str, float]:
        return {"p50_s": statistics.median(latencies), "max_s": max(latencies)}

    result = {
        "figure": "device time per evaluation round (1, 4, 16 questions on one window), "
        "with and without prefix sharing; encoder clip latency with rounds running vs without",
        "sharing_ratio": sharing_ratio,
        "target": "sharing_ratio <= 0.3; clip latency unchanged within noise (~ one chunk)",
        "round_device_s": rounds,
        "per_question_s": {k: {n: v / n for n, v in r.items()} for k, r in rounds.items()},
        "encoder_latency": {
            "without_rounds": summary(without),
            "with_rounds": summary(with_rounds),
            "p50_ratio": statistics.median(with_rounds) / statistics.median(without),
            "scoring_step_median_s": step_s,
            "chunk_tokens": args.chunk,
            "clips": args.clips,
            "clip_period_s": args.clip_period,
            "encode_stand_in_s": args.encode_ms / 1000.0,
            "evaluation_share": 0.2,
        },
        "shapes": {
            "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "ffn": config.intermediate_size,
            "layers": args.layers,
            "vocab": args.vocab,
            "tokens": {"header": HEADER, "visual": args.visual, "question": QUESTION},
            "round_chunk_tokens": args.round_chunk,
            "note": "real 2B widths; fewer layers (28 real) and a reduced vocabulary "
            "(151936 real) on this CPU; drop recipe [4,18] of 28 scaled to the depth; the "
            "encoder is a timed stand-in, not the vision tower",
        },
        "plan": {"kind": plan.kind, "layers": plan.layers, "ratios": plan.ratios},
        "dtype": "float32",
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "machine": platform.processor() or platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    for kind, times in rounds.items():
        print(f"  {kind:>8}: " + ", ".join(f"{n} q {s:.2f} s" for n, s in times.items()))
    print(f"  sharing_ratio at 16: {sharing_ratio:.3f}")
    print(f"  clip latency without rounds {summary(without)}, with {summary(with_rounds)}")
    print(f"  -> {RESULTS}")


def _encode_stand_in(seconds: float) -> torch.Tensor:
    """Matrix products sized so that one call of the returned closure's work takes about
    ``seconds``: a fixed, repeatable encoder load (returns the operand; see _encode)."""
    a = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    per = (time.perf_counter() - start) / 20
    return torch.tensor([max(1, round(seconds / per))])


def _encode(reps: torch.Tensor) -> None:
    a = torch.randn(512, 512)
    for _ in range(int(reps.item())):
        a @ a


def _median_step_s(scoring: ScoreRound) -> float:
    steps = []
    while True:
        start = time.perf_counter()
        done = scoring.step()
        steps.append(time.perf_counter() - start)
        if done is not None:
            return statistics.median(steps)


def _clip_latencies(
    args: argparse.Namespace, reps: torch.Tensor, make_round: Callable[[], ScoreRound] | None
) -> list[float]:
    """Clips arriving on a fixed period, scheduled against back-to-back scoring rounds."""

    async def run() -> list[float]:
        feeds = ClipFeeds()
        queue: DropQueue[Clip] = DropQueue(1000, "drop_oldest", name="bench")
        feeds.add("cam", queue)
        scheduler = Scheduler(SchedulerPolicy(encode_batch_clips=1, evaluation_share=0.2))
        frames = np.zeros((4, 2, 2, 3), dtype=np.uint8)
        arrived: dict[int, float] = {}
        latencies: list[float] = []
        t0 = time.perf_counter()
        put = 0
        current: ScoreRound | None = None
        while len(latencies) < args.clips:
            now = time.perf_counter() - t0
            while put < args.clips and put * args.clip_period <= now:
                arrived[put] = t0 + put * args.clip_period
                queue.put_nowait(Clip("cam", put, frames, float(put), float(put) + 2.0))
                put += 1
            if make_round is not None and current is None:
                current = make_round()
            rounds = (1,) if current is not None else ()
            item = scheduler.schedule(feeds, [], _MEMORY, now, rounds=rounds)
            started = time.perf_counter()
            if isinstance(item, EncodeBatch):
                _encode(reps)
                for clip in item.clips:
                    latencies.append(time.perf_counter() - arrived[clip.seq])
            elif isinstance(item, ScoreBatch) and current is not None:
                if current.step() is not None:
                    current = None
            elif item is None:
                await asyncio.sleep(0.001)
                continue
            scheduler.account(item, time.perf_counter() - started, now)
        return latencies

    return asyncio.run(run())


if __name__ == "__main__":
    main()
