"""LLM prefill time with video-level token dropping vs none (VideoChat-Flash §5 recipe).

A 28-layer Qwen2 decoder at reduced width (random weights; depth, head layout and token counts
as the real model) prefills a prompt with >= 4,000 visual tokens twice: with
``uniform0_attention`` at layers [4, 18], ratios [1, 0.75, 0.25] (the model-card recipe), and
without dropping (the baseline, measured in the same run). Also prints the FLOP arithmetic:
visual tokens pass 4 + 14·0.75 + 10·0.25 = 17 layer-equivalents instead of 28 (≈1.65× fewer
per-token FLOPs), and attention (quadratic in length) shrinks more.

    python benchmarks/model_prefill_drop.py [--hidden 256] [--visual 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from model.qwen2 import DropPlan, Qwen2Config, Qwen2LM, stage_keep_count

RESULTS = Path(__file__).resolve().parent / "results" / "model_prefill_drop.json"
PLAN = DropPlan("uniform0_attention", (4, 18), (1.0, 0.75, 0.25))
TEXT_BEFORE, TEXT_AFTER = 14, 40  # system/user header; time message + question + assistant


def layer_flops(config: Qwen2Config, n: int) -> float:
    """Forward FLOPs of one decoder layer over n tokens (causal prefill, multiply-add = 2)."""
    h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    q_dim, kv_dim = config.num_attention_heads * d, config.num_key_value_heads * d
    linear = 2 * n * (h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * f)
    attention = 2 * q_dim * n * n  # q·kᵀ and p·v over the causal half: 2·(2·n²/2·q_dim)
    return float(linear + attention)


def prefill_flops(config: Qwen2Config, n_text: int, n_visual: int, plan: DropPlan | None) -> float:
    """Whole-prefill FLOPs; with a plan, layer ℓ runs on the visual tokens left before it,
    plus the scoring cost (k_proj over all tokens) at attention stages."""
    total, visual = 0.0, n_visual
    stage_at = {} if plan is None else {layer: s for s, layer in enumerate(plan.layers)}
    for layer in range(config.num_hidden_layers):
        if plan is not None and layer in stage_at:
            stage = stage_at[layer]
            if plan.stage_kind(stage) == "attention":
                kv_dim = config.num_key_value_heads * config.head_dim
                total += 2 * (n_text + visual) * config.hidden_size * kv_dim
            visual = stage_keep_count(n_visual, plan.ratios[stage + 1])
        total += layer_flops(config, n_text + visual)
    return total


def visual_layer_equivalents(n_layers: int, plan: DropPlan) -> float:
    """Layers a visual token passes on average: Σ over stages of ratio × layers in the stage."""
    bounds = (0, *plan.layers, n_layers)
    return sum(r * (bounds[i + 1] - bounds[i]) for i, r in enumerate(plan.ratios))


def time_prefill(lm: Qwen2LM, embeds: torch.Tensor, n_visual: int, plan: DropPlan | None) -> float:
    start = time.perf_counter()
    lm.prefill(embeds, visual_start=TEXT_BEFORE, visual_len=n_visual, drop=plan)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="LLM width (real 2B: 1536)")
    parser.add_argument("--visual", type=int, default=4096, help="visual tokens (64 per clip)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    parser.add_argument("--attention", default="sdpa", help="attention backend")
    args = parser.parse_args()

    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=28,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
    )
    torch.manual_seed(0)
    lm = Qwen2LM(config, attention=args.attention).eval()
    n_text = TEXT_BEFORE + TEXT_AFTER
    embeds = torch.randn(1, n_text + args.visual, config.hidden_size)

    times: dict[str, list[float]] = {"nodrop": [], "drop": []}
    for plan in (None, PLAN):  # warm-up (allocator, kernels)
        time_prefill(lm, embeds, args.visual, plan)
    for _ in range(args.repeats):  # interleaved so drifts hit both settings alike
        times["nodrop"].append(time_prefill(lm, embeds, args.visual, None))
        times["drop"].append(time_prefill(lm, embeds, args.visual, PLAN))

    median = {k: statistics.median(v) for k, v in times.items()}
    flops = {
        "nodrop": prefill_flops(config, n_text, args.visual, None),
        "drop": prefill_flops(config, n_text, args.visual, PLAN),
    }
    equivalents = visual_layer_equivalents(config.num_hidden_layers, PLAN)
    result = {
        "figure": "LLM prefill time, uniform0_attention [4,18] [1,0.75,0.25] vs no dropping",
        "config": {**config.__dict__, "attention": args.attention},
        "plan": {"kind": PLAN.kind, "layers": PLAN.layers, "ratios": PLAN.ratios},
        "tokens": {"text": n_text, "visual": args.visual},
        "seconds": times,
        "median_seconds": median,
        "measured_speedup": median["nodrop"] / median["drop"],
        "predicted_speedup_flops": flops["nodrop"] / flops["drop"],
        "predicted_visual_token_flop_ratio": config.num_hidden_layers / equivalents,
        "gflops": {k: v / 1e9 for k, v in flops.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"prefill {n_text + args.visual} tokens, 28 layers, hidden {args.hidden}:")
    print(f"  no dropping {median['nodrop']:.2f} s, dropping {median['drop']:.2f} s")
    print(f"  measured speed-up {result['measured_speedup']:.2f}x")
    print(f"  predicted (FLOPs)  {result['predicted_speedup_flops']:.2f}x")
    print(f"  visual-token FLOPs {result['predicted_visual_token_flop_ratio']:.2f}x fewer")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
