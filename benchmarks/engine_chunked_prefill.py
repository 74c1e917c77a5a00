"""Longest single device step during a long prefill, chunked vs whole (the encoder's stall).

Measured at the runner level (``model.prefill.PrefillJob``): the daemon's scheduler runs one
device step at a time, so an encode batch that arrives during a prefill waits for at most the
step in progress. Whole: the prefill is one step. Chunked: ``chunk_tokens`` rows through one
segment (the layers between two drops) per step. ``stall_ratio`` = longest chunked step / the
whole prefill (target <= 0.2). The 2B checkpoint's LLM widths (hidden 1536, 12 / 2 heads,
FFN 8960), fewer layers and a reduced vocabulary on this CPU (named in the JSON), random weights,
float32, the model card's drop recipe scaled to the depth.

    python benchmarks/engine_chunked_prefill.py [--layers 4] [--tokens 512] [--chunk 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from model.prefill import PrefillJob
from model.synthetic import llm_2b_config, model_card_drop, random_llm

RESULTS = Path(__file__).resolve().parent / "results" / "engine_chunked_prefill.json"
HEADER, QUESTION = 14, 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (real 2B: 28)")
    parser.add_argument("--vocab", type=int, default=16384, help="vocabulary (real: 151936)")
    parser.add_argument("--tokens", type=int, default=512, help="prompt tokens in all")
    parser.add_argument("--chunk", type=int, default=64, help="rows per chunked step")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared host)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = llm_2b_config(num_layers=args.layers, vocab_size=args.vocab)
    lm = random_llm(config, seed=0)
    plan = model_card_drop(args.layers)
    visual = args.tokens - HEADER - QUESTION
    embeds = torch.randn(
        1, args.tokens, config.hidden_size, generator=torch.Generator().manual_seed(0)
    )

    def steps(chunk: int | None) -> list[float]:
        job = PrefillJob(
            lm, embeds, visual_start=HEADER, visual_len=visual, drop=plan, chunk_tokens=chunk
        )
        out = []
        done = False
        while not done:
            start = time.perf_counter()
            done = job.step()
            out.append(time.perf_counter() - start)
        return out

    steps(args.chunk)  # warm-up
    whole = steps(None)
    chunked = steps(args.chunk)
    whole_s = sum(whole)
    result = {
        "figure": "longest device step during a long prefill: chunked vs whole",
        "stall_ratio": max(chunked) / whole_s,
        "target": "<= 0.2",
        "level": "runner (model.prefill.PrefillJob steps); h-sched's engine not merged here",
        "whole_prefill_s": whole_s,
        "whole_segment_steps_s": whole,
        "chunked_longest_step_s": max(chunked),
        "chunked_total_s": sum(chunked),
        "chunked_steps": len(chunked),
        "chunked_steps_s": chunked,
        "chunk_tokens": args.chunk,
        "shapes": {
            "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "ffn": config.intermediate_size,
            "layers": args.layers,
            "vocab": args.vocab,
            "tokens": {"header": HEADER, "visual": visual, "question": QUESTION},
            "note": "real 2B widths; fewer layers (28 real), shorter prompt (32k on a GPU) "
            "and a reduced vocabulary on this CPU; drop recipe [4,18] of 28 scaled",
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
    print(f"{args.tokens}-token prefill, {args.layers} layers at 2B width, chunks of {args.chunk}:")
    print(f"  whole {whole_s:.2f} s in {len(whole)} segment(s) (one step if unchunked)")
    print(
        f"  chunked: {len(chunked)} steps, longest {max(chunked):.3f} s, total {sum(chunked):.2f} s"
    )
    print(f"  stall_ratio {result['stall_ratio']:.3f}  -> {RESULTS}")


if __name__ == "__main__":
    main()
