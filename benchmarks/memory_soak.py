"""24 simulated hours of one stream at 1 fps into a small budget: memory and append cost stay flat.

21,600 clips of 64 tokens (one clip per 4 s) are appended as fast as possible into a bank whose
share holds a few minutes of full-resolution history, so consolidation runs all the time. Every
simulated 10 minutes a query takes a view, selects 1,024 tokens uniformly and reads them, and
keeps the view across the next appends (the copy-on-write path). Recorded over simulated time:
arena bytes in use, process RSS, and the cost of each append.

Baseline in the same run: the first simulated hour. Reported ratios: append cost of the last hour
over the first hour, and RSS at the end over RSS once the budget was first reached.

    python benchmarks/memory_soak.py [--hours 24] [--hidden 64] [--budget-mb 2] [--policy merge]
"""

from __future__ import annotations

import argparse
import array
import json
import platform
import statistics
import time
from pathlib import Path

import psutil
import torch

from memory.bank import MemoryBank, select_segments
from memory.settings import MemorySettings

RESULTS = Path(__file__).resolve().parent / "results"
CLIP_S = 4.0  # 4 frames at 1 fps
CLIP_TOKENS = 64
QUERY_EVERY_CLIPS = 150  # 10 simulated minutes
SAMPLE_EVERY_CLIPS = 50


def run(hours: float, hidden: int, budget_mb: float, policy: str, window_s: float) -> dict:
    settings = MemorySettings.model_validate(
        {"budget_mb": budget_mb, "recent_window_s": window_s, "policy": policy}
    )
    bank = MemoryBank(
        settings,
        hidden_size=hidden,
        dtype=torch.float32,
        device=torch.device("cpu"),
        fingerprint="soak",
    )
    bank.add_stream("cam")
    process = psutil.Process()
    generator = torch.Generator().manual_seed(0)
    # A pool of clips drawn once (drawing random numbers is not what is measured); slowly
    # drifting scenes, so neighbouring clips are alike as in real video.
    base = torch.randn(64, CLIP_TOKENS, hidden, generator=generator)
    clips = int(hours * 3600 / CLIP_S)
    per_clip_s = array.array("d", bytes(8 * clips))  # preallocated: the benchmark's own
    # bookkeeping must not grow the RSS it measures
    samples: list[dict[str, float]] = []
    held_view = None
    full_at_clip: int | None = None
    for i in range(clips):
        tokens = base[(i // 16) % 64] + 0.1 * base[i % 64]
        t0 = time.perf_counter()
        bank.append_clip("cam", tokens, i * CLIP_S, (i + 1) * CLIP_S)
        per_clip_s[i] = time.perf_counter() - t0
        if i % QUERY_EVERY_CLIPS == 0:
            held_view = bank.view("cam")  # held until the next query
            chosen = select_segments(held_view, since=None, until=None, token_budget=1024)
            held_view.tokens(chosen)
        if i % SAMPLE_EVERY_CLIPS == 0 or i == clips - 1:
            stats = bank.stats("cam", fps=1.0)
            if full_at_clip is None and stats.consolidations > 0:
                full_at_clip = i
            samples.append(
                {
                    "sim_hours": (i + 1) * CLIP_S / 3600,
                    "arena_bytes": stats.bytes,
                    "budget_bytes": stats.budget_bytes,
                    "rss_bytes": process.memory_info().rss,
                    "segments": stats.segments,
                }
            )
    del held_view
    stats = bank.stats("cam", fps=1.0)
    clips_per_hour = int(3600 / CLIP_S)
    hourly_us = [
        statistics.mean(per_clip_s[h : h + clips_per_hour]) * 1e6
        for h in range(0, len(per_clip_s), clips_per_hour)
    ]
    rss_full = next(
        s["rss_bytes"] for s in samples if s["sim_hours"] * 3600 / CLIP_S >= (full_at_clip or 0)
    )
    after_full = [s for s in samples if s["sim_hours"] >= 2.0]
    return {
        "clips": clips,
        "hidden": hidden,
        "budget_mb": budget_mb,
        "policy": policy,
        "recent_window_s": window_s,
        "share_tokens": stats.budget_tokens,
        "share_minutes_full_resolution": stats.budget_tokens / CLIP_TOKENS * CLIP_S / 60,
        "budget_reached_at_sim_hours": (full_at_clip or 0) * CLIP_S / 3600,
        "final": {
            "tokens": stats.tokens,
            "segments": stats.segments,
            "levels": {str(k): v for k, v in stats.levels.items()},
            "span_hours": (stats.span[1] - stats.span[0]) / 3600 if stats.span else 0.0,
            "consolidations": stats.consolidations,
            "folded_pairs": stats.folded_pairs,
            "evicted": stats.evicted,
            "window_s": stats.window_s,
        },
        "append_us_per_sim_hour": hourly_us,
        "append_us_p50": statistics.median(per_clip_s) * 1e6,
        "append_us_max": max(per_clip_s) * 1e6,
        "append_cost_ratio_last_hour_vs_first": hourly_us[-1] / hourly_us[0],
        "append_cost_ratio_last_hour_vs_hour_2": hourly_us[-1]
        / hourly_us[min(1, len(hourly_us) - 1)],
        "arena_bytes_max": max(s["arena_bytes"] for s in samples),
        "rss_mb_when_full": rss_full / 2**20,
        "rss_mb_end": samples[-1]["rss_bytes"] / 2**20,
        "rss_ratio_end_vs_full": samples[-1]["rss_bytes"] / rss_full,
        "rss_mb_range_after_hour_2": (
            (max(s["rss_bytes"] for s in after_full) - min(s["rss_bytes"] for s in after_full))
            / 2**20
            if after_full
            else None
        ),
        "samples": samples,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    hours = [s["sim_hours"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    top.plot(hours, [s["arena_bytes"] / 2**20 for s in samples], label="arena tokens (MiB)")
    top.plot(hours, [s["budget_bytes"] / 2**20 for s in samples], "--", label="share (MiB)")
    top.set_ylabel("MiB")
    top.legend(loc="center right")
    rss = top.twinx()
    rss.plot(hours, [s["rss_bytes"] / 2**20 for s in samples], color="tab:red", label="RSS")
    rss.set_ylabel("process RSS (MiB)", color="tab:red")
    per_hour = result["append_us_per_sim_hour"]
    bottom.bar([h + 0.5 for h in range(len(per_hour))], per_hour, width=0.8)
    bottom.set_ylabel("mean append cost (µs)")
    bottom.set_xlabel("simulated hours")
    fig.suptitle(
        f"memory soak: {result['clips']} clips, H={result['hidden']}, "
        f"{result['budget_mb']} MiB, policy {result['policy']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--budget-mb", type=float, default=2.0)
    parser.add_argument("--policy", choices=["merge", "thin"], default="merge")
    parser.add_argument("--window-s", type=float, default=120.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = run(args.hours, args.hidden, args.budget_mb, args.policy, args.window_s)
    result["wall_s"] = time.perf_counter() - started
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_soak.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "memory_soak.png")
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
