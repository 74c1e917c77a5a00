"""Bad input is answered with one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from cli_harness import FLASHWATCH, run_cli


def _assert_one_line_error(result: object, *needles: str) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.returncode != 0  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("flashwatch:")]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], stderr


def test_malformed_yaml(tmp_path: Path, cli_env: dict[str, str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("memory:\n  budget_mb: [1, 2\n")
    _assert_one_line_error(run_cli("serve", "--no-tui", "-c", str(config), env=cli_env), "bad.yaml")


def test_unknown_config_key(tmp_path: Path, cli_env: dict[str, str]) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("memory:\n  budgetmb: 64\n")
    result = run_cli("serve", "--no-tui", "-c", str(config), env=cli_env)
    _assert_one_line_error(result, "memory.budgetmb", "unknown key")


@pytest.mark.parametrize(
    ("assignment", "needle"),
    [("memory.budget_mb=-3", "memory.budget_mb"), ("nonsense", "KEY.PATH=VALUE"),
     ("model.device=tpu", "model.device")],
)  # fmt: skip
def test_bad_set(assignment: str, needle: str, cli_env: dict[str, str]) -> None:
    _assert_one_line_error(run_cli("serve", "--no-tui", "--set", assignment, env=cli_env), needle)


def test_missing_config_file(cli_env: dict[str, str]) -> None:
    _assert_one_line_error(run_cli("serve", "-c", "/nonexistent.yaml", env=cli_env), "nonexistent")


def test_demo_without_redis_server_or_redis(tmp_path: Path, cli_env: dict[str, str]) -> None:
    # A PATH without redis-server: the demo cannot start a private one (and nothing answers
    # at the default URL), so it says what to install.
    if _default_redis_answers():
        pytest.skip("a Redis answers at 127.0.0.1:6379 on this machine; the demo would use it")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python_bin = Path(FLASHWATCH).parent
    env = dict(cli_env, PATH=f"{python_bin}{os.pathsep}{bin_dir}")
    result = run_cli("serve", "--no-tui", env=env)
    _assert_one_line_error(result, "unreachable", "redis-server is not installed")


def test_ask_without_daemon(cli_env: dict[str, str]) -> None:
    env = dict(cli_env, FLASHWATCH_REDIS_URL="redis://127.0.0.1:9/0")
    _assert_one_line_error(run_cli("ask", "hello", env=env), "redis://127.0.0.1:9/0", "unreachable")


@pytest.mark.parametrize("command", ["ask", "status", "forget"])
def test_a_bad_redis_url_is_one_line(command: str, cli_env: dict[str, str]) -> None:
    forget = ["--stream", "demo", "--since=-2m", "--until=-1m"]
    extra = {"ask": ["hello"], "status": ["--once"], "forget": forget}[command]
    result = run_cli(command, "--redis-url", "notaurl", *extra, env=cli_env)
    _assert_one_line_error(result, "--redis-url", "not a Redis URL")


def test_a_usage_error_is_one_line(cli_env: dict[str, str]) -> None:
    result = run_cli("forget", "--stream", "demo", "--since", "-2m", env=cli_env)
    _assert_one_line_error(result, "forget", "--since", "--help")


def _default_redis_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False
