"""Forgetting an interval (privacy): confirmed, shown as a gap, never read again."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from cli_harness import ServeProcess, run_cli, status_once, wait_for

pytestmark = pytest.mark.integration


def test_forget_removes_an_interval_from_memory_and_answers(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str]
) -> None:
    daemon = serve("--redis-url", redis_server)

    def with_clips() -> dict | None:
        snapshot = status_once(redis_server, cli_env)
        return snapshot if snapshot and snapshot["streams"][0]["clips"] >= 4 else None

    span = wait_for(with_clips, 90, "four clips")["streams"][0]["memory"]["span"]
    since, until = span[0] + 2.0, span[0] + 4.0
    interval = ["--since", str(since), "--until", str(until)]
    result = run_cli("forget", "--redis-url", redis_server, "--stream", "demo", *interval,
                     "--json", env=cli_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    confirmation = json.loads(result.stdout)
    assert confirmation["forgotten"] == {"stream": "demo", "start": since, "end": until}
    # Forgetting is idempotent; without --json people read local ISO 8601 times.
    again = run_cli("forget", "--redis-url", redis_server, "--stream", "demo", *interval,
                    env=cli_env)  # fmt: skip
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
    assert re.fullmatch(rf"forgot demo from {iso} to {iso}\n", again.stdout), again.stdout

    def forgotten_gap() -> bool:
        snapshot = status_once(redis_server, cli_env)
        gaps = snapshot["streams"][0]["gaps"] if snapshot else []
        return any(g["reason"] == "forgotten" for g in gaps)

    wait_for(forgotten_gap, 10, "the forgotten gap in status")
    asked = run_cli("ask", "--json", "--redis-url", redis_server, "--max-new-tokens", "2",
                    "--since", str(span[0]), "What happened?", env=cli_env)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert any(g["reason"] == "forgotten" for g in answer["gaps"])
    for read in answer["evidence"]:
        assert read["end"] <= since or read["start"] >= until, "forgotten video was read"

    unknown = run_cli("forget", "--redis-url", redis_server, "--stream", "nope",
                      "--since=-1m", "--until=-10s", env=cli_env)  # fmt: skip
    assert unknown.returncode == 1 and "unknown stream" in unknown.stderr
    assert daemon.terminate() == 0
