"""Eight concurrent questions through the real engine: time-sliced vs batched decode vs batched
decode plus prefix KV reuse.

Model: the tiny vision tower and a Qwen2 decoder of width ``--hidden`` (4 / 2 heads, FFN 4x)
with ``--layers`` layers, no dropping, random weights, float32 on this CPU. Memory: 16 clips
(1,024 visual tokens). Eight different questions over the same selection are submitted at once
(``query.max_in_flight`` 8), each generating ``--new-tokens`` tokens. Conditions, same run:

- ``time_sliced``: ``engine.decode_batch_max`` 1, no prefix cache (each answer's step alone);
- ``batched``: ``decode_batch_max`` 8 (one forward pass per step for all answers);
- ``batched_reuse``: plus the prefix cache (the first question computes the header+visual
  prefix, the seven others resume from it).

Reported: wall seconds for all eight answers, prefix hits, and the ratios to time-sliced.

    python benchmarks/engine_concurrent.py [--hidden 512] [--layers 8] [--new-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
import torch
from _query_common import (
    MemoryReplies,
    ask_engine,
    machine,
    random_clip_tokens,
    running,
    scaled_loaded,
    write_result,
)

from memory.bank import MemoryBank
from memory.settings import MemorySettings
from model.loader import LoadedModel
from sinks.settings import QuerySettings
from streamer.engine.core import Engine
from streamer.engine.settings import EngineSettings

CONDITIONS = {
    "time_sliced": {"decode_batch_max": 1, "prefix_cache_mb": 0.0},
    "batched": {"decode_batch_max": 8, "prefix_cache_mb": 0.0},
    "batched_reuse": {"decode_batch_max": 8, "prefix_cache_mb": 256.0},
}
ANSWERS = 8
CLIPS = 16


async def run(loaded: LoadedModel, condition: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    hidden = loaded.model.hidden_size
    bank = MemoryBank(
        MemorySettings(budget_mb=64.0),
        hidden_size=hidden,
        dtype=torch.float32,
        device=torch.device("cpu"),
        fingerprint=loaded.fingerprint,
    )
    bank.add_stream("cam")
    rng = np.random.default_rng(0)
    now = time.time()
    for i in range(CLIPS):
        end = now - 2.0 * (CLIPS - 1 - i)
        bank.append_clip("cam", random_clip_tokens(rng, hidden), end - 2.0, end)
    replies = MemoryReplies()
    query = QuerySettings(
        max_in_flight=ANSWERS, max_queued=16, max_new_tokens_limit=256, default_max_new_tokens=32
    )
    engine = Engine(loaded, bank, replies, query, EngineSettings(**condition))
    async with running(engine):
        while engine.stats().warm_up_s is None:
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        answers = await asyncio.gather(
            *[
                ask_engine(
                    engine,
                    replies,
                    f"Question {i}: what happened?",
                    now=time.time(),
                    max_new_tokens=new_tokens,
                )
                for i in range(ANSWERS)
            ]
        )
        wall = time.perf_counter() - started
        stats = engine.stats()
    return {
        "wall_s": wall,
        "tokens": [a.tokens for a in answers],
        "prefix_hits": stats.prefix_hits,
        "texts": [a.text for a in answers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()
    loaded = scaled_loaded(args.hidden, layers=args.layers, drop=None)
    rows = {name: asyncio.run(run(loaded, c, args.new_tokens)) for name, c in CONDITIONS.items()}
    texts = {name: row.pop("texts") for name, row in rows.items()}
    base_wall = rows["time_sliced"]["wall_s"]
    result = {
        "benchmark": "engine_concurrent",
        "shapes": {"hidden": args.hidden, "layers": args.layers, "heads": "4/2", "ffn": "4x",
                   "visual_tokens": CLIPS * 64, "answers": ANSWERS, "new_tokens": args.new_tokens},
        "rows": rows,
        "speedup_batched": base_wall / rows["batched"]["wall_s"],
        "speedup_batched_reuse": base_wall / rows["batched_reuse"]["wall_s"],
        # greedy answers must not depend on batching or reuse
        "same_answers": all(t == texts["time_sliced"] for t in texts.values()),
        "machine": machine(),
    }  # fmt: skip
    for name, row in rows.items():
        print(f"{name:14s} {row['wall_s']:6.2f} s  prefix hits {row['prefix_hits']}")
    print(
        f"speed-up: batched {result['speedup_batched']:.2f}x, "
        f"batched + reuse {result['speedup_batched_reuse']:.2f}x"
    )
    print(f"same greedy answers in every condition: {result['same_answers']}")
    print(f"wrote {write_result('engine_concurrent', result)}")


if __name__ == "__main__":
    main()
