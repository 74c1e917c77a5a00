"""Memory survives restarts: clean stop, SIGKILL during snapshot writes, another model."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_harness import ServeProcess, run_cli, status_once, wait_for

pytestmark = pytest.mark.integration

AT_STOP = re.compile(r"memory 'demo' at stop: (\d+) tokens, span ([\d.]+)–([\d.]+)")
RESTORED = re.compile(
    r"restored 'demo' from \S+: (\d+) tokens, \d+ segments, span ([\d.]+)–([\d.]+)"
)


def _args(redis_url: str, snapshots: Path, *extra: str) -> list[str]:
    return ["--redis-url", redis_url, "--set", f"memory.snapshot_dir={snapshots}",
            "--set", "memory.snapshot_interval_s=1", *extra]  # fmt: skip


def _clips(redis_url: str, env: dict[str, str], n: int) -> bool:
    snapshot = status_once(redis_url, env)
    return snapshot is not None and snapshot["streams"][0]["clips"] >= n


def test_clean_restart_restores_the_history(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    first = serve(*_args(redis_server, snapshots))
    wait_for(lambda: _clips(redis_server, cli_env, 3), 60, "three clips")
    assert first.terminate() == 0
    stopped = AT_STOP.search(first.output())
    assert stopped, first.output()[-2000:]

    second = serve(*_args(redis_server, snapshots))
    restored = wait_for(lambda: RESTORED.search(second.output()), 60, "the restore message")
    assert restored.groups() == stopped.groups()  # same token count and span, to the ms
    snapshot = wait_for(lambda: status_once(redis_server, cli_env), 30, "status")
    memory = snapshot["streams"][0]["memory"]
    assert memory["span"][0] == pytest.approx(float(stopped.group(2)), abs=1e-3)
    assert memory["tokens"] >= int(stopped.group(1))
    assert second.terminate() == 0


def test_sigkill_during_snapshot_writes_keeps_the_previous_snapshot(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    for attempt in range(3):
        daemon = serve(*_args(redis_server, snapshots))
        wanted = 2 + 2 * attempt
        wait_for(lambda: _clips(redis_server, cli_env, wanted), 60, "clips")  # noqa: B023
        time.sleep(1.5)  # at least one periodic snapshot holds them
        # Kill the moment a snapshot write is under way (its temporary file exists), else
        # at a random point of the snapshot cycle.
        deadline = time.monotonic() + 3.0 + attempt
        while time.monotonic() < deadline:
            if any(".tmp-" in path.name for path in snapshots.iterdir()):
                break
        daemon.terminate(signal.SIGKILL)

        after = serve(*_args(redis_server, snapshots))
        restored = wait_for(lambda: RESTORED.search(after.output()), 60, "restore")  # noqa: B023
        assert int(restored.group(1)) > 0
        assert "rejected" not in after.output()
        assert not (snapshots / "rejected").exists()
        assert after.terminate() == 0


def test_a_snapshot_from_another_model_is_refused(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    first = serve(*_args(redis_server, snapshots))
    wait_for(lambda: _clips(redis_server, cli_env, 2), 60, "two clips")
    assert first.terminate() == 0

    other = serve(*_args(redis_server, snapshots, "--set", "model.tiny_seed=7"))
    wait_for(lambda: "snapshot rejected" in other.output(), 60, "the refusal message")
    line = next(x for x in other.output().splitlines() if "snapshot rejected" in x)
    assert "WARNING" in line and "starting empty" in line and "model" in line
    assert list((snapshots / "rejected").iterdir()), "moved aside, never deleted"
    assert other.terminate() == 0


def _snapshot_health(redis_url: str, env: dict[str, str]) -> dict | None:
    snapshot = status_once(redis_url, env)
    return snapshot["snapshots"] if snapshot is not None else None


def test_a_corrupt_manifest_does_not_stop_the_start(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    first = serve(*_args(redis_server, snapshots))
    wait_for(lambda: _clips(redis_server, cli_env, 2), 60, "two clips")
    assert first.terminate() == 0
    manifest = snapshots / "demo.fwmem" / "manifest.json"
    broken = json.loads(manifest.read_text())
    del broken["tokens"]  # a missing key, and an odd file where rejected/ goes
    manifest.write_text(json.dumps(broken))
    (snapshots / "rejected").write_text("not a folder")

    second = serve(*_args(redis_server, snapshots))
    wait_for(lambda: "snapshot rejected" in second.output(), 60, "the rejection message")
    line = next(x for x in second.output().splitlines() if "snapshot rejected" in x)
    assert "WARNING" in line and "starting empty" in line and "tokens" in line
    wait_for(lambda: _clips(redis_server, cli_env, 1), 60, "a clip after the start")
    asked = run_cli("ask", "--json", "--redis-url", redis_server, "--max-new-tokens", "2",
                    "What happened?", env=cli_env, timeout=90)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["answer"] is not None
    health = wait_for(lambda: _snapshot_health(redis_server, cli_env), 30, "status")
    assert health["enabled"] and health["failures"] == 0
    assert second.terminate() == 0
    assert "Traceback" not in second.output()
    assert (snapshots / "rejected").is_dir()


def test_a_full_disk_is_in_status_and_a_clean_stop_still_exits_0(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    daemon = serve(*_args(redis_server, snapshots))
    folder = snapshots / "demo.fwmem"
    wait_for(lambda: (folder / "data-000001.bin").exists(), 60, "a first snapshot with tokens")
    # From now on every record write fails with ENOSPC, from the kernel: the file written to
    # and the next ones the writer would start are all /dev/full.
    for k in range(1, 60):
        (folder / f"data-{k:06d}.bin").unlink(missing_ok=True)
        (folder / f"data-{k:06d}.bin").symlink_to("/dev/full")

    def failing() -> dict | None:
        health = _snapshot_health(redis_server, cli_env)
        return health if health and health["failures"] >= 2 else None

    health = wait_for(failing, 60, "failed snapshots counted in status")
    assert "No space left on device" in health["last_error"]
    assert daemon.terminate() == 0  # the final snapshot fails too, softly
    output = daemon.output()
    assert "Traceback" not in output and "stopped" in output
    assert sum("No space left" in line and "WARNING" in line for line in output.splitlines()) == 1
