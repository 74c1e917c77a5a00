"""Bytes per hour of full-resolution history, measured against theory (tokens x hidden x dtype).

One simulated hour at 1 fps (900 clips of 64 tokens = 57,600 tokens) is appended to a bank whose
budget holds exactly that hour, for the released models' hidden sizes in bfloat16 (2B: 1536, 7B:
3584) and a float32 CPU case. Measured: the arena's bytes in use, the growth of the process RSS,
the bookkeeping on top (merge sizes, the index) and the snapshot file size; each is divided by
the theory computed in the same run (``57,600 x hidden x dtype size``). The reported capacity in
hours must come out as 1.0.

    python benchmarks/memory_bytes_per_hour.py
"""

from __future__ import annotations

import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from memory.bank import MemoryBank
from memory.capacity import MIB
from memory.settings import MemorySettings
from memory.snapshot import snapshot_path

RESULTS = Path(__file__).resolve().parent / "results" / "memory_bytes_per_hour.json"
CLIPS_PER_HOUR = 900  # 3600 frames at 1 fps, 4 frames per clip
CLIP_TOKENS = 64
CASES = (
    ("2B", 1536, torch.bfloat16),
    ("7B", 3584, torch.bfloat16),
    ("cpu-f32", 896, torch.float32),
)


def measure(name: str, hidden: int, dtype: torch.dtype) -> dict[str, float | int | str]:
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    tokens = CLIPS_PER_HOUR * CLIP_TOKENS
    theory = tokens * hidden * dtype_bytes
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    with tempfile.TemporaryDirectory() as folder:
        settings = MemorySettings(budget_mb=theory / MIB, snapshot_dir=folder)
        bank = MemoryBank(
            settings, hidden_size=hidden, dtype=dtype, device=torch.device("cpu"),
            fingerprint="bench",
        )  # fmt: skip
        bank.add_stream("cam")
        clip = torch.randn(CLIP_TOKENS, hidden).to(dtype)
        started = time.perf_counter()
        for i in range(CLIPS_PER_HOUR):
            bank.append_clip("cam", clip, 4.0 * i, 4.0 * i + 4)
        append_s = time.perf_counter() - started
        rss_after = process.memory_info().rss
        stats = bank.stats("cam", fps=1.0)
        arena = bank._streams["cam"].arena
        used_bytes = arena.storage[: arena.used].nbytes
        sizes_bytes = arena.sizes[: arena.used].nbytes
        view = bank.view("cam")
        index_bytes = sys.getsizeof(view.segments) + sum(sys.getsizeof(s) for s in view.segments)
        started = time.perf_counter()
        bank.save_snapshots()
        snapshot_s = time.perf_counter() - started
        snapshot_bytes = snapshot_path(Path(folder), "cam").stat().st_size
        del bank, view, arena
    gc.collect()
    return {
        "model": name,
        "hidden": hidden,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_hour": stats.tokens,
        "theory_bytes_per_hour": theory,
        "theory_gb_per_hour": theory / 1e9,
        "arena_bytes_per_hour": used_bytes,
        "arena_ratio_vs_theory": used_bytes / theory,
        "stats_bytes_ratio_vs_theory": stats.bytes / theory,
        "rss_growth_ratio_vs_theory": (rss_after - rss_before) / theory,
        "bookkeeping_ratio_vs_theory": (sizes_bytes + index_bytes) / theory,
        "snapshot_ratio_vs_theory": snapshot_bytes / theory,
        "capacity_hours_reported": stats.capacity_hours or 0.0,
        "consolidations": stats.consolidations,
        "append_us_per_clip": append_s / CLIPS_PER_HOUR * 1e6,
        "snapshot_s": snapshot_s,
    }


def main() -> None:
    torch.set_num_threads(1)
    rows = [measure(*case) for case in CASES]
    result = {
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
