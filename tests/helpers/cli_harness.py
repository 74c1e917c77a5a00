"""Helpers for tests that run the real ``flashwatch`` command as a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

FLASHWATCH = str(Path(sys.executable).parent / "flashwatch")
REPO = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLASHWATCH, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``predicate`` returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


class ServeProcess:
    """``flashwatch serve`` in the background, with its output kept in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [FLASHWATCH, "serve", "--no-tui", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log_path.read_text()

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                pytest.fail(f"serve did not stop within {timeout:g} s:\n{self.output()[-3000:]}")
        self._log.close()
        return self.proc.returncode


def status_once(url: str, env: dict[str, str]) -> dict[str, Any] | None:
    result = run_cli("status", "--json", "--once", "--redis-url", url, env=env, timeout=30)
    if result.returncode != 0:
        return None
    snapshot: dict[str, Any] = json.loads(result.stdout)
    return snapshot
