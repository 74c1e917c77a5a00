"""The engine benchmarks still run against today's engine: each, at a tiny size, encodes every
live clip it produced and answers (a benchmark that subclasses engine or bank classes breaks
silently when their signatures change: every encode failed, and the figure was of nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, script: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLASHWATCH_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "encode failed" not in proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads((tmp_path / f"{script}.json").read_text())
    return result


def test_query_interleave_runs_and_encodes_every_clip(tmp_path: Path) -> None:
    result = _run(tmp_path, "query_interleave", "--hidden", "64", "--seconds", "3",
                  "--rounds", "1", "--clip-s", "0.5", "--window-clips", "4",
                  "--new-tokens", "4")  # fmt: skip
    for runs in result["runs"].values():
        run = runs[0]
        assert run["clips_produced"] >= 3 and not run["clips_dropped"]
        assert run["clips_encoded_live"] == run["clips_produced"] and run["answers"] >= 1


def test_engine_chunked_prefill_runs_and_measures_a_stall(tmp_path: Path) -> None:
    result = _run(tmp_path, "engine_chunked_prefill", "--clips", "4", "--chunk", "64",
                  "--rounds", "1", "--idle-s", "0.5", "--clip-s", "0.1")  # fmt: skip
    for condition in ("chunked", "whole"):
        run = result["runs"][condition][0]
        assert run["clips_produced"] >= 5 and not run["clips_dropped"]
        assert run["visual_tokens"] >= 4 * 64  # the question read the memory
        assert run["lag_during_prefill_s"]["n"] >= 1  # clips arrived while it ran
    assert result["stall_ratio"] > 0
