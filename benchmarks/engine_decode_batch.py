"""Batched decode across in-flight answers vs time-sliced (one answer per step), same run.

The 2B checkpoint's LLM widths (hidden 1536, 12 query / 2 KV heads, FFN 8960) with fewer layers
and a reduced vocabulary so that this CPU finishes quickly (both named in the JSON); random
weights. ``--answers`` sequences with ragged contexts (their KV filled with random rows:
decode cost does not depend on what the cache holds) live in one ``KVPool``. Time-sliced: each
step decodes one answer (batch 1), round-robin, as the engine did; batched: one
``Qwen2LM.decode_batch`` over all of them. ``speedup`` = time-sliced / batched seconds for the
same number of tokens, measured for each ``--dtypes`` entry (both arms of one dtype interleaved).

The headline ``speedup`` is at bfloat16, the production dtype: there (on this CPU's AVX512-BF16,
as on a GPU) a step is bound by reading the weights, which batching reads once per step instead of
once per answer. In float32 this CPU's GEMM is compute-bound already at 8 rows, so the float32
ratio (``speedup_by_dtype``) is lower and says how much of the gain is the weights' bandwidth.

    python benchmarks/engine_decode_batch.py [--layers 4] [--vocab 16384] [--answers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from model.kv import KVCache, KVPool, layer_capacity
from model.synthetic import llm_2b_config, random_llm

RESULTS = Path(__file__).resolve().parent / "results" / "engine_decode_batch.json"


def fill(cache: KVCache, rows: int, generator: torch.Generator, dtype: torch.dtype) -> None:
    """Put ``rows`` random K/V rows in every layer of a pooled cache (as a prefill would)."""
    for layer in cache.layers:
        k = torch.randn(1, 2, rows, 128, generator=generator).to(dtype)
        layer.append(k, -k)
    cache.next_position = rows


def measure(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """Both arms at one dtype, interleaved rounds -> seconds per round and their medians."""
    config = llm_2b_config(num_layers=args.layers, vocab_size=args.vocab)
    lm = random_llm(config, seed=0, dtype=dtype)
    max_new = args.tokens * (args.rounds + 1) * 2 + 4
    capacity = layer_capacity(args.layers, max_text=2 * args.context, max_visual=0, max_new=max_new)
    pool = KVPool.for_model(
        config, slots=args.answers, layer_capacity=capacity, device="cpu", dtype=dtype
    )
    generator = torch.Generator().manual_seed(0)
    caches = []
    for rows in contexts(args):
        caches.append(pool.acquire())
        fill(caches[-1], rows, generator, dtype)
    tokens = torch.arange(args.answers) % args.vocab

    def time_sliced() -> float:
        start = time.perf_counter()
        for _ in range(args.tokens):
            for i, cache in enumerate(caches):  # one answer per device step
                lm.decode_batch(tokens[i : i + 1], [cache])
        return time.perf_counter() - start

    def batched() -> float:
        start = time.perf_counter()
        for _ in range(args.tokens):
            lm.decode_batch(tokens, caches)
        return time.perf_counter() - start

    batched(), time_sliced()  # warm-up
    times: dict[str, list[float]] = {"time_sliced": [], "batched": []}
    for _ in range(args.rounds):  # interleaved so drifts on a shared machine hit both alike
        times["time_sliced"].append(time_sliced())
        times["batched"].append(batched())
    median = {k: statistics.median(v) for k, v in times.items()}
    n_tokens = args.tokens * args.answers
    return {
        "speedup": median["time_sliced"] / median["batched"],
        "seconds": times,
        "tokens_per_s": {k: n_tokens / v for k, v in median.items()},
    }


def contexts(args: argparse.Namespace) -> list[int]:
    """Ragged context lengths spread around the mean."""
    return [
        args.context // 2 + (i * args.context) // max(1, args.answers - 1)
        for i in range(args.answers)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (real 2B: 28)")
    parser.add_argument("--vocab", type=int, default=16384, help="vocabulary (real: 151936)")
    parser.add_argument("--answers", type=int, default=8, help="concurrent answers")
    parser.add_argument("--context", type=int, default=1024, help="mean context tokens")
    parser.add_argument("--tokens", type=int, default=4, help="tokens per answer and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared host)"
    )
    parser.add_argument(
        "--dtypes", default="bfloat16,float32", help="comma-separated; the first is the headline"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.dtypes.split(",") if n.strip()]
    by_dtype = {name: measure(args, getattr(torch, name)) for name in names}
    headline = by_dtype[names[0]]
    config = llm_2b_config(num_layers=args.layers, vocab_size=args.vocab)
    n_tokens = args.tokens * args.answers
    result = {
        "figure": f"decode of {args.answers} concurrent answers: batched vs time-sliced",
        "speedup": headline["speedup"],
        "dtype": names[0],
        "target": ">= 3",
        "speedup_by_dtype": {name: r["speedup"] for name, r in by_dtype.items()},
        "shapes": {
            "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "ffn": config.intermediate_size,
            "layers": args.layers,
            "vocab": args.vocab,
            "note": "real 2B widths; fewer layers (28 real) and a reduced vocabulary "
            "(151936 real) on this CPU",
            "contexts": contexts(args),
        },
        "tokens_per_round": n_tokens,
        "runs": by_dtype,
        "load_average": os.getloadavg()[0],
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.answers} answers, {args.layers} layers at 2B width, {n_tokens} tokens/round:")
    for name, r in by_dtype.items():
        s = {k: statistics.median(v) for k, v in r["seconds"].items()}
        print(
            f"  {name}: time-sliced {s['time_sliced']:.2f} s, batched {s['batched']:.2f} s,"
            f" speedup {r['speedup']:.2f}x"
        )
    print(f"  -> {RESULTS}")


if __name__ == "__main__":
    main()
