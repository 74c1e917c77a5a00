"""Whose Redis it is: a configured Redis is waited for, never replaced by a private one; one
daemon per Redis and prefix; Redis refusing us (password, ACL) is one line at start."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from cli_harness import ServeProcess, run_cli, status_once, wait_for
from redis_harness import RedisServer, free_port

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-pw"


def _serving(url: str, env: dict[str, str], clips: int = 1) -> dict[str, Any] | None:
    snapshot = status_once(url, env)
    if snapshot is None:
        return None
    demo = next(s for s in snapshot["streams"] if s["name"] == "demo")
    return snapshot if demo["clips"] >= clips and demo["memory"]["tokens"] > 0 else None


def _one_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("flashwatch:")]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], stderr
    return lines[0]


def test_a_configured_redis_that_is_down_at_boot_is_waited_for(
    serve: Callable[..., ServeProcess], cli_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = dict(cli_env, FLASHWATCH_REDIS_URL=url)
    # A second stream that fails for good: its memory share goes back to the demo stream.
    daemon = serve("--source", f"gone={tmp_path / 'missing.mp4'}", env=env)
    wait_for(lambda: "is unreachable" in daemon.output(), 60, "the unreachable warning")
    assert "retrying" in daemon.output()
    assert "private" not in daemon.output()
    assert not (Path(env["FLASHWATCH_STATE_DIR"]) / "embedded-redis.json").exists()

    server = RedisServer(tmp_path / "later", port=port)
    (tmp_path / "later").mkdir()
    server.start()  # Redis comes up after the daemon: the daemon finds it
    try:
        snapshot = wait_for(lambda: _serving(url, env), 90, "the daemon to reach its Redis")
        assert snapshot["redis"]["state"] == "connected" and snapshot["redis"]["url"] == url
        answer = run_cli("ask", "--json", "--max-new-tokens", "4", "What moves?", env=env)
        assert answer.returncode == 0, answer.stderr + daemon.output()[-3000:]

        def share_returned() -> bool:
            snap = status_once(url, env) or {"streams": []}
            by_name = {s["name"]: s for s in snap["streams"]}
            gone, demo = by_name.get("gone"), by_name.get("demo")
            return bool(
                gone and demo and gone["state"] == "failed"
                and demo["memory"]["budget_tokens"] > 2 * gone["memory"]["budget_tokens"]
            )  # fmt: skip

        wait_for(share_returned, 30, "the failed stream's share to go to the demo stream")
        assert daemon.terminate() == 0, daemon.output()[-3000:]
    finally:
        server.stop()


def test_a_second_daemon_on_the_same_redis_and_prefix_refuses(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str]
) -> None:
    # A lock that would outlive the test: only the takeover of a gone daemon frees it.
    first = serve("--redis-url", redis_server, "--set", "redis.lock_ttl_s=600")
    wait_for(lambda: _serving(redis_server, cli_env), 90, "the first daemon")
    second = run_cli("serve", "--no-tui", "--redis-url", redis_server, env=cli_env, timeout=60)
    assert second.returncode == 1
    _one_line(second.stderr, "another flashwatch daemon", f"pid {first.proc.pid}",
              "prefix 'flashwatch'")  # fmt: skip

    first.terminate(signal.SIGKILL)  # its lock stays; on this host its dead pid is seen
    third = serve("--redis-url", redis_server)
    wait_for(lambda: "flashwatch is running" in third.output(), 90, "the successor to start")
    assert "from a daemon that is gone" in third.output()
    assert third.terminate() == 0, third.output()[-3000:]


@pytest.fixture
def secured(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path, ("--requirepass", PASSWORD))
    server.start()
    yield server
    server.stop()


def _with(url: str, user: str, password: str) -> str:
    return url.replace("redis://", f"redis://{user}:{password}@")


@pytest.mark.parametrize(
    ("password", "needles"),
    [("wrong-pw", ("authentication failed", "wrong user name or password")),
     ("", ("authentication failed", "requires a password"))],
)  # fmt: skip
def test_a_wrong_or_missing_password_is_one_line_at_start(
    secured: RedisServer, cli_env: dict[str, str], password: str, needles: tuple[str, ...]
) -> None:
    url = _with(secured.url, "", password) if password else secured.url
    result = run_cli("serve", "--no-tui", "--redis-url", url, env=cli_env, timeout=60)
    assert result.returncode == 1
    line = _one_line(result.stderr, *needles)
    assert "unreachable" not in line and "wrong-pw" not in result.stderr


def test_an_acl_user_without_xgroup_is_one_line_at_start(
    secured: RedisServer, cli_env: dict[str, str]
) -> None:
    admin = redis.Redis.from_url(_with(secured.url, "", PASSWORD))
    admin.execute_command("ACL", "SETUSER", "limited", "on", ">user-pw", "~flashwatch:*",
                          "&flashwatch:*", "+@all", "-xgroup")  # fmt: skip
    admin.close()
    url = _with(secured.url, "limited", "user-pw")
    result = run_cli("serve", "--no-tui", "--redis-url", url, env=cli_env, timeout=60)
    assert result.returncode == 1
    _one_line(result.stderr, "ACL user 'limited' lacks +xgroup")
    assert "user-pw" not in result.stderr


def test_an_unreachable_explicit_url_is_retried_without_showing_its_password(
    serve: Callable[..., ServeProcess],
) -> None:
    daemon = serve("--redis-url", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    wait_for(lambda: "flashwatch is running" in daemon.output(), 60, "the daemon to run")
    assert "is unreachable" in daemon.output()
    assert daemon.terminate() == 0
    assert "hunter2" not in daemon.output() and "Traceback" not in daemon.output()
