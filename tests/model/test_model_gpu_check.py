"""``benchmarks/gpu_check.py --smoke`` runs end to end on the CPU, writes every figure and its
exactness checks, and imports no video, bus or tokenizer library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_mode(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["imported_forbidden"] == []
    assert result["skipped"] == []
    assert [row["batch"] for row in result["clips"]] == [1, 2]
    assert all(row["clips_per_s"] > 0 for row in result["clips"])
    sdpa = result["backends"]["sdpa"]
    prefill = sdpa["prefill"]
    for key in ("nodrop_ms", "drop_ms", "prefix_reuse_ms", "prefix_compute_ms"):
        assert prefill[key] > 0, key
    assert prefill["check_prefix_reuse_max_abs_logit_diff"] < 1e-4
    assert prefill["check_prefix_reuse_same_argmax"]
    assert prefill["long_prefill"]["chunked_longest_step_ms"] > 0
    assert [row["concurrent"] for row in sdpa["decode"]] == [1, 2]
    assert sdpa["checks"]["check_batched_greedy_same"]
    snapshot = result["snapshot_copy"]
    assert snapshot["chunks"] > 1 and snapshot["check_rows_same"]
