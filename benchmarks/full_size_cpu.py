"""The full VideoChat-Flash 2B geometry end to end on this CPU, through the real engine.

Shapes (``VideoChat-Flash-Qwen2_5-2B_res448``): UMT-L vision tower (width 1024, 24 declared
layers / 23 built, 16 heads, 448 px, 16 px patches: 784 tokens a frame, 3,136 a clip, merged to
64), Qwen2 LLM (hidden 1536, 28 layers, 12 / 2 heads, FFN 8960, vocab 151,936, tied
embeddings), the model-card dropping (uniform at layer 4, attention at 18). Random weights,
built on the fly with the project's seeded initialiser (nothing is downloaded), float32.

One clip is fed to the engine's clip queue and encoded into memory; then one question of about
``--question-tokens`` tokens (byte-level tokenizer) is asked over it with ``max_new_tokens`` =
``--new-tokens``. Reported: seconds to build the weights, to encode the clip (the engine's own
batch time), to the first token (plan + prefill), per decode step, and the process's peak RSS
after each phase. Proves the full-size path runs here; the figures are CPU figures.

    python benchmarks/full_size_cpu.py [--question-tokens 1000] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import resource
import time
from typing import Any

import numpy as np
import torch
from _query_common import DROP_PLAN, MemoryReplies, ask_engine, machine, running, write_result

from memory.bank import MemoryBank
from memory.settings import MemorySettings
from model.config import VideoChatFlashConfig
from model.loader import LoadedModel
from model.prompt import byte_level_tokenizer
from model.qwen2 import Qwen2Config
from model.tiny import build_random
from model.vision import VisionConfig
from sinks.settings import QuerySettings
from streamer.engine.core import Engine
from streamer.engine.settings import EngineSettings
from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip

T0 = 1_800_000_000.0

LLM_2B = Qwen2Config(
    vocab_size=151_936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)
UMT_L_448 = VisionConfig(image_size=448)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def build(seed: int) -> tuple[LoadedModel, float]:
    started = time.perf_counter()
    config = VideoChatFlashConfig(
        vision_tower="umt-hd-large", vision=UMT_L_448, llm=LLM_2B, tokenizer_model_max_length=None
    )
    model = build_random(config, seed)
    loaded = LoadedModel(
        model=model,
        tokenizer=byte_level_tokenizer(),
        fingerprint=f"full-size-random-{seed}",
        device=torch.device("cpu"),
        dtype=torch.float32,
        attention="sdpa",
        drop=DROP_PLAN,
        max_context_tokens=32768,
    )
    return loaded, time.perf_counter() - started


async def measure(loaded: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    bank = MemoryBank(
        MemorySettings(budget_mb=64.0),
        hidden_size=loaded.model.hidden_size,
        dtype=loaded.dtype,
        device=loaded.device,
        fingerprint=loaded.fingerprint,
    )
    bank.add_stream("cam")
    replies = MemoryReplies()
    query = QuerySettings(
        max_in_flight=1, max_queued=4, max_new_tokens_limit=64, default_max_new_tokens=8
    )
    settings = EngineSettings(encode_batch_clips=1, warm_up=False)  # warm-up = 2nd full pass
    engine = Engine(loaded, bank, replies, query, settings)
    clips: DropQueue[Clip] = DropQueue(4, "drop_oldest", name="clips")
    clips.bind(asyncio.get_running_loop())
    engine.add_source("cam", clips)
    size = loaded.model.image_size
    frames = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    phases: dict[str, Any] = {}
    async with running(engine):
        clips.put_nowait(Clip("cam", 0, frames, T0, T0 + 4.0))
        async with asyncio.timeout(args.timeout):
            while engine.stats().clips_encoded < 1:
                await asyncio.sleep(0.05)
        stats = engine.stats()
        phases["encode_s"] = stats.last_batch_ms / 1000.0
        phases["encode_failures"] = stats.encode_failures
        phases["rss_after_encode_mib"] = peak_rss_mib()
        question = ("Describe the scene in detail. " * (args.question_tokens // 30 + 1))[
            : args.question_tokens
        ]
        asked = time.perf_counter()
        answer = await asyncio.wait_for(
            ask_engine(
                engine,
                replies,
                question,
                now=time.time(),
                max_new_tokens=args.new_tokens,
                deadline_s=3600.0,
            ),
            args.timeout,
        )
        total = time.perf_counter() - asked
    prompt_tokens = len(loaded.tokenizer.encode(question))
    ttft = total if answer.ttft_s is None else answer.ttft_s
    phases.update(
        {
            "question_tokens": prompt_tokens,
            "visual_tokens": answer.frames * 16,
            "tokens_generated": answer.tokens,
            "ttft_s": ttft,
            "decode_s_per_token": (total - ttft) / max(1, answer.tokens - 1),
            "answer_total_s": total,
            "rss_after_answer_mib": peak_rss_mib(),
        }
    )
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per phase")
    args = parser.parse_args()
    started = time.perf_counter()
    loaded, build_s = build(args.seed)
    params = {
        "vision": sum(p.numel() for p in loaded.model.vision.parameters()),
        "llm": sum(p.numel() for p in loaded.model.llm.parameters()),
        "total": sum(p.numel() for p in loaded.model.parameters()),
    }
    rss_built = peak_rss_mib()
    print(f"built {params['total'] / 1e9:.2f} B parameters in {build_s:.1f} s, {rss_built:.0f} MiB")
    phases = asyncio.run(measure(loaded, args))
    result = {
        "benchmark": "full_size_cpu",
        "shapes": {
            "vision": dataclasses.asdict(UMT_L_448),
            "llm": dataclasses.asdict(LLM_2B),
            "drop": dataclasses.asdict(DROP_PLAN),
            "dtype": "float32",
            "weights": "random (model.tiny.build_random, seeded)",
        },
        "parameters": params,
        "build_s": build_s,
        "rss_after_build_mib": rss_built,
        **phases,
        "wall_s": time.perf_counter() - started,
        "machine": machine(),
    }
    path = write_result("full_size_cpu", result)
    shown = {k: v for k, v in result.items() if k not in ("shapes", "machine")}
    print(shown)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
