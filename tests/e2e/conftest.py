"""Fixtures that run the real ``flashwatch`` command as a subprocess."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_harness import ServeProcess


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment for CLI subprocesses: a private state dir, no inherited Redis URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHWATCH_")}
    env["FLASHWATCH_STATE_DIR"] = str(tmp_path / "state")
    env["PYTHONUNBUFFERED"] = "1"
    env["FLASHWATCH_HTTP_PORT"] = "0"  # a free port each: daemons run side by side
    return env


@pytest.fixture
def serve(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        process = ServeProcess(list(args), env or cli_env, tmp_path / f"serve{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.terminate(signal.SIGKILL)
