"""ToMe (HiCo) merge cost as a share of the vision encoder's time per clip, at 448 px.

Every measurement uses the real 448-px token count (3136 tokens per 4-frame clip, merged to 64 in
six steps). Two views, both in one run, float32 on the CPU threads given:

1. ``scaled``: a whole encoder at reduced width (256, 4 heads of 64 channels, 4 blocks) against
   ToMe at that width: share = tome / (encoder + tome), both measured.
2. ``umt_l_estimate``: ToMe at the real width 1024 with 16 head chunks (measured) against a real
   UMT-L encoder estimated as 23 x one measured full-width block (the patch embedding and the
   final LayerNorm are measured too; running all 23 blocks would take minutes here).

    python benchmarks/model_tome_share.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from _timing import median_seconds

from model.hico import tome_merge
from model.vision import Block, UMTVisionEncoder, VisionConfig

RESULTS = Path(__file__).resolve().parent / "results" / "model_tome_share.json"
TARGET = 64


@torch.no_grad()
def scaled_share(repeats: int) -> dict[str, float | int]:
    config = VisionConfig(image_size=448, width=256, declared_layers=5, num_heads=4)
    encoder = UMTVisionEncoder(config).eval()
    clip = torch.randn(1, 4, 3, 448, 448)
    features = encoder(clip)  # [1, 3136, 256]
    encoder_s = median_seconds(lambda: encoder(clip), repeats)
    tome_s = median_seconds(lambda: tome_merge(features, TARGET, config.num_heads), repeats)
    return {
        "width": config.width,
        "heads": config.num_heads,
        "blocks": config.built_layers,
        "tokens": config.tokens_per_clip,
        "encoder_ms": encoder_s * 1e3,
        "tome_ms": tome_s * 1e3,
        "tome_share_of_encode": tome_s / (encoder_s + tome_s),
        "tome_over_encoder_ratio": tome_s / encoder_s,
    }


@torch.no_grad()
def umt_l_estimate(repeats: int) -> dict[str, float | int]:
    config = VisionConfig()  # UMT-L @ 448: width 1024, 16 heads, 23 built blocks
    block = Block(config).eval()
    tokens = torch.randn(1, config.tokens_per_clip, config.width)
    block_s = median_seconds(lambda: block(tokens), repeats)
    patch = torch.nn.Conv3d(3, config.width, (1, 16, 16), stride=(1, 16, 16))
    norm = torch.nn.LayerNorm(config.width, eps=config.final_layernorm_eps)
    frames = torch.randn(1, 3, 4, 448, 448)
    edges_s = median_seconds(lambda: norm(patch(frames).flatten(2).transpose(1, 2)), repeats)
    encoder_s = config.built_layers * block_s + edges_s
    tome_s = median_seconds(lambda: tome_merge(tokens, TARGET, config.num_heads), repeats)
    return {
        "width": config.width,
        "heads": config.num_heads,
        "blocks": config.built_layers,
        "tokens": config.tokens_per_clip,
        "block_ms_measured": block_s * 1e3,
        "patch_embed_and_norm_ms_measured": edges_s * 1e3,
        "encoder_ms_estimated": encoder_s * 1e3,
        "tome_ms": tome_s * 1e3,
        "tome_share_of_encode": tome_s / (encoder_s + tome_s),
        "tome_over_encoder_ratio": tome_s / encoder_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scaled = scaled_share(args.repeats)
    print(f"scaled: {json.dumps(scaled)}", flush=True)
    real = umt_l_estimate(args.repeats)
    print(f"umt_l_estimate: {json.dumps(real)}", flush=True)
    result = {
        "benchmark": "model_tome_share",
        "what": "ToMe merge time per 448-px clip (3136 -> 64 tokens) vs vision encoder time",
        "threads": args.threads,
        "repeats": args.repeats,
        "device": "cpu",
        "dtype": "float32",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "scaled": scaled,
        "umt_l_estimate": real,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
