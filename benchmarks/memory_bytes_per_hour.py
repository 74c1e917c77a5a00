"""Bytes per hour of full-resolution history: memory actually allocated, against theory.

One simulated hour at 1 fps (900 clips of 64 tokens = 57,600 tokens) is appended to a bank whose
budget holds exactly that hour, for the released models' hidden sizes in bfloat16 (2B: 1536, 7B:
3584) and a float32 CPU case. The headline, ``measured_bytes_per_hour``, is what the process
really allocated for it: the growth of the device allocator's bytes (``torch.cuda``) when the
memory lives on a GPU, else the growth of the process RSS (pages actually touched) from before
the bank was built to after the hour was appended. It is divided by the theory computed in the
same run (``57,600 x hidden x dtype size``); what is above 1.0 is the bookkeeping (merge sizes,
cached segment means, the index) and allocator overhead. Also measured: the snapshot's bytes on
disk. ``accounted_ratio_vs_theory`` is the bank's own arithmetic (its stats), for comparison
only. The reported capacity in hours must come out as 1.0.

    python benchmarks/memory_bytes_per_hour.py
"""

from __future__ import annotations

import gc
import json
import platform
import tempfile
import time
from pathlib import Path

import psutil
import torch

from memory.bank import MemoryBank
from memory.capacity import MIB
from memory.settings import MemorySettings

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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    process = psutil.Process()
    clip = torch.randn(CLIP_TOKENS, hidden).to(device=device, dtype=dtype)

    def allocated() -> int:
        if device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return int(process.memory_info().rss)

    gc.collect()
    before = allocated()
    with tempfile.TemporaryDirectory() as folder:
        settings = MemorySettings(budget_mb=theory / MIB, snapshot_dir=folder)
        bank = MemoryBank(
            settings, hidden_size=hidden, dtype=dtype, device=device, fingerprint="bench"
        )
        bank.add_stream("cam")
        started = time.perf_counter()
        for i in range(CLIPS_PER_HOUR):
            bank.append_clip("cam", clip, 4.0 * i, 4.0 * i + 4)
        append_s = time.perf_counter() - started
        measured = allocated() - before
        stats = bank.stats("cam", fps=1.0)
        started = time.perf_counter()
        bank.save_snapshots()
        snapshot_s = time.perf_counter() - started
        snapshot_bytes = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
        bank.close()
        del bank
    gc.collect()
    return {
        "model": name,
        "hidden": hidden,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "tokens_per_hour": stats.tokens,
        "theory_bytes_per_hour": theory,
        "theory_gb_per_hour": theory / 1e9,
        "measured_by": "cuda allocator" if device.type == "cuda" else "process RSS",
        "measured_bytes_per_hour": measured,
        "measured_gb_per_hour": measured / 1e9,
        "measured_ratio_vs_theory": measured / theory,
        "accounted_ratio_vs_theory": stats.bytes / theory,
        "snapshot_bytes_on_disk": snapshot_bytes,
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
