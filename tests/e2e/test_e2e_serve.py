"""The walking skeleton end to end: serve (demo config), status, ask, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_harness import FLASHWATCH, REPO, ServeProcess, run_cli, status_once, wait_for

pytestmark = pytest.mark.integration


def _has_clips(url: str, env: dict[str, str], clips: int) -> dict[str, Any] | None:
    snapshot = status_once(url, env)
    if snapshot is None:
        return None
    stream = snapshot["streams"][0]
    return snapshot if stream["clips"] >= clips and stream["memory"]["tokens"] > 0 else None


def test_demo_serves_status_and_answers(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    daemon = serve("--config", str(REPO / "configs" / "demo.yaml"), "--redis-url", redis_server,
                   "--set", f"memory.snapshot_dir={tmp_path / 'snapshots'}")  # fmt: skip
    snapshot = wait_for(lambda: _has_clips(redis_server, cli_env, 2), 90, "two encoded clips")

    stream = snapshot["streams"][0]
    assert stream["name"] == "demo"
    assert stream["state"] == "live"
    assert stream["reconnects"] == 0
    assert stream["memory"]["budget_tokens"] >= stream["memory"]["tokens"] > 0
    start, end = stream["memory"]["span"]
    assert end > start > 1e9  # wall-clock seconds of a live source
    assert isinstance(stream["gaps"], list)
    assert {"pending", "completed", "failed"} <= set(snapshot["queries"])

    result = run_cli("ask", "--json", "--redis-url", redis_server, "--timeout", "60",
                     "--max-new-tokens", "8", "What is moving?", env=cli_env)  # fmt: skip
    assert result.returncode == 0, result.stderr + daemon.output()[-3000:]
    answer = json.loads(result.stdout)
    assert answer["stream"] == ["demo"]
    assert isinstance(answer["answer"], str)
    assert answer["frames"] > 0
    assert answer["evidence"], "an answer cites the memory it read"
    for span in answer["evidence"]:
        assert start - 1 <= span["start"] < span["end"]
    assert answer["latency_s"] > 0
    assert answer["tokens"] >= 1

    def completed() -> dict[str, Any] | None:
        after = status_once(redis_server, cli_env)
        return after if after is not None and after["queries"]["completed"] >= 1 else None

    queries = wait_for(completed, 10, "the status to count the answered query")["queries"]
    # the answer's prefill computed its question-independent prefix (and cached it)
    assert queries["prefix_misses"] + queries["prefix_hits"] >= 1
    assert queries["kv_slots_free"] is not None

    assert daemon.terminate(signal.SIGTERM) == 0, daemon.output()[-3000:]
    assert "Traceback" not in daemon.output()


def test_ask_streams_text_without_json(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str]
) -> None:
    daemon = serve("--redis-url", redis_server)  # the built-in demo, no --config
    wait_for(lambda: _has_clips(redis_server, cli_env, 1), 90, "one encoded clip")
    result = run_cli("ask", "--redis-url", redis_server, "--max-new-tokens", "4", "Hello?",
                     env=cli_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    unknown = run_cli("ask", "--redis-url", redis_server, "--stream", "nope", "Hi", env=cli_env)
    assert unknown.returncode == 1
    assert "unknown_stream" in unknown.stderr
    assert daemon.terminate(signal.SIGINT) == 0


def test_embedded_redis_is_found_by_ask_and_status(
    serve: Callable[..., ServeProcess], cli_env: dict[str, str]
) -> None:
    daemon = serve()  # the built-in demo with no Redis URL from anywhere: a private one
    wait_for(lambda: "the demo's private Redis" in daemon.output(), 60, "the embedded Redis")
    state = Path(cli_env["FLASHWATCH_STATE_DIR"]) / "embedded-redis.json"
    url = json.loads(state.read_text())["url"]
    assert f"redis-cli -u {url}" in daemon.output()  # a ready line for the README's recipes
    assert run_cli("redis-url", env=cli_env).stdout.strip() == url

    def clips_without_flags() -> bool:
        result = run_cli("status", "--json", "--once", env=cli_env, timeout=30)
        return result.returncode == 0 and json.loads(result.stdout)["streams"][0]["clips"] >= 1

    wait_for(clips_without_flags, 60, "status (no flags) to show a clip")
    result = run_cli("ask", "--json", "--max-new-tokens", "4", "Anything?", env=cli_env)
    assert result.returncode == 0, result.stderr + daemon.output()[-2000:]

    # Piped, `status` prints one plain snapshot (not an empty live view) and exits.
    piped = run_cli("status", env=cli_env, timeout=30)
    assert piped.returncode == 0 and "demo live" in piped.stdout and "\x1b[" not in piped.stdout

    # A reader that goes away (`| head`) ends `ask` quietly.
    cut = subprocess.run(
        f"{FLASHWATCH} ask --max-new-tokens 200 'Tell me everything' | head -c 1 >/dev/null",
        shell=True, env=cli_env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "Traceback" not in cut.stderr and "BrokenPipe" not in cut.stderr, cut.stderr

    # The README's redis-cli recipe runs as written against the demo's private Redis.
    setup, xadd, get = _readme_redis_cli_recipe()
    shell_env = dict(cli_env, PATH=f"{Path(FLASHWATCH).parent}{os.pathsep}{cli_env['PATH']}")

    def bash(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], env=shell_env, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip

    assert bash(f"{setup}\n{xadd}").returncode == 0
    wait_for(lambda: '"final"' in bash(f"{setup}\n{get}").stdout, 90, "the README's answer")

    # A second demo `serve` refuses in one line naming the first; the first keeps its state.
    before = state.read_text()
    second = run_cli("serve", "--no-tui", env=cli_env, timeout=60)
    assert second.returncode == 1
    lines = [line for line in second.stderr.splitlines() if "already" in line]
    assert len(lines) == 1 and f"pid {daemon.proc.pid}" in lines[0] and url in lines[0]
    assert "Traceback" not in second.stderr
    assert state.read_text() == before
    assert run_cli("ask", "--max-new-tokens", "2", "Still there?", env=cli_env).returncode == 0

    assert daemon.terminate() == 0
    assert not state.exists()


def test_a_killed_daemons_embedded_redis_is_stopped_by_the_next_start(
    serve: Callable[..., ServeProcess], cli_env: dict[str, str]
) -> None:
    first = serve()
    state = Path(cli_env["FLASHWATCH_STATE_DIR"]) / "embedded-redis.json"
    wait_for(state.exists, 60, "the embedded Redis state file")
    orphan = json.loads(state.read_text())["redis_pid"]
    first.terminate(signal.SIGKILL)
    assert Path(f"/proc/{orphan}").exists(), "redis-server outlives a SIGKILLed daemon"

    second = serve()
    wait_for(lambda: "left behind by a daemon that was killed" in second.output(), 60, "cleanup")
    wait_for(lambda: not _running(orphan), 10, "the orphaned redis-server to exit")
    assert second.terminate() == 0


def _readme_redis_cli_recipe() -> tuple[str, str, str]:
    """The README's setup, XADD and GET lines (not the blocking SUBSCRIBE), as written."""
    setup = "R=$(flashwatch redis-url)"
    block = (REPO / "README.md").read_text().split(setup, 1)[1].split("```", 1)[0]
    lines = block.strip().splitlines()
    xadd = next(line for line in lines if " XADD " in line)
    get = next(line for line in lines if " GET " in line)
    return setup, xadd, get


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
