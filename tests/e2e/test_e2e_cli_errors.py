"""Bad input is answered with one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
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


def test_unreachable_redis_without_redis_server(tmp_path: Path, cli_env: dict[str, str]) -> None:
    # A PATH without redis-server: the daemon cannot start a private one.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python_bin = Path(FLASHWATCH).parent
    env = dict(cli_env, PATH=f"{python_bin}{os.pathsep}{bin_dir}")
    env["FLASHWATCH_REDIS_URL"] = "redis://127.0.0.1:9/0"
    result = run_cli("serve", "--no-tui", env=env)
    _assert_one_line_error(result, "unreachable", "redis-server is not installed")


def test_unreachable_explicit_redis_url(cli_env: dict[str, str]) -> None:
    result = run_cli("serve", "--no-tui", "--redis-url", "redis://:hunter2@127.0.0.1:9/0",
                     env=cli_env)  # fmt: skip
    _assert_one_line_error(result, "unreachable")
    assert "hunter2" not in result.stderr


def test_ask_without_daemon(cli_env: dict[str, str]) -> None:
    env = dict(cli_env, FLASHWATCH_REDIS_URL="redis://127.0.0.1:9/0")
    _assert_one_line_error(run_cli("ask", "hello", env=env), "no flashwatch daemon")
