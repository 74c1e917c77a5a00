"""A fleet on one redis-server: a dead owner's stream is adopted from the shared snapshot folder,
requests sent during the failover are answered once each by the adopter, a paused owner gives
its stream up when it wakes (never two writers), and placement auto balances four streams over
two daemons, then moves them all to the one left."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from cli_harness import ServeProcess, wait_for

from memory.frames import frame_name
from memory.snapshot import MANIFEST, folder_for
from sinks.client import ask
from sinks.fleet.records import LeaseRecord
from sinks.settings import Keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HTTP_AT = re.compile(r"HTTP API, metrics and probes at (http://\S+)")
TTL_S = 2.0
KEYS = Keys()


def _args(redis_url: str, snapshots: Path, daemon_id: str, *extra: str) -> list[str]:
    return [
        "--redis-url", redis_url,
        "--set", f"fleet.daemon_id={daemon_id}",
        "--set", f"fleet.lease_ttl_s={TTL_S}",
        "--set", "redis.lock_ttl_s=3",
        "--set", f"memory.snapshot_dir={snapshots}",
        "--set", "memory.snapshot_interval_s=1",
        *extra,
    ]  # fmt: skip


def _status(daemon: ServeProcess) -> dict[str, Any] | None:
    """The daemon's own status over its HTTP API (None while it does not answer)."""
    found = HTTP_AT.search(daemon.output())
    if found is None:
        return None
    try:
        with urllib.request.urlopen(f"{found.group(1)}/v1/status", timeout=5) as response:
            status: dict[str, Any] = json.load(response)
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return status


def _owned(daemon: ServeProcess) -> dict[str, int]:
    """stream -> fence of the leases the daemon holds (empty when it does not answer)."""
    status = _status(daemon)
    if status is None or status.get("fleet") is None:
        return {}
    return {lease["stream"]: lease["fence"] for lease in status["fleet"]["leases"]}


def _stream(daemon: ServeProcess, name: str) -> dict[str, Any] | None:
    status = _status(daemon) or {"streams": []}
    return next((s for s in status["streams"] if s["name"] == name), None)


def _manifest_fence(snapshots: Path, stream: str = "demo") -> int | None:
    try:
        manifest = json.loads((folder_for(snapshots, stream) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    fence: int = manifest["fence"]
    return fence


def _serving(daemon: ServeProcess, clips: int = 2) -> bool:
    stream = _stream(daemon, "demo")
    return bool(stream and stream["clips"] >= clips and "demo" in _owned(daemon))


def _owner_and_standby(
    serve: Callable[..., ServeProcess], redis_url: str, snapshots: Path
) -> tuple[ServeProcess, ServeProcess, int]:
    """Daemon a owns "demo" (snapshot written with its fence), daemon b stands by."""
    owner = serve(*_args(redis_url, snapshots, "a"))
    wait_for(lambda: _serving(owner), 90, "daemon a to serve the demo stream")
    fence = _owned(owner)["demo"]
    wait_for(lambda: _manifest_fence(snapshots) == fence, 30, "a's snapshot with its fence")
    standby = serve(*_args(redis_url, snapshots, "b"))

    def standing_by() -> bool:
        status = _status(standby)
        return bool(status and status["fleet"] and status["fleet"]["standby"] == ["demo"])

    wait_for(standing_by, 90, "daemon b to stand by for the demo stream")
    assert _stream(standby, "demo") is None  # not served there: unknown to b
    return owner, standby, fence


def test_a_killed_owners_stream_is_adopted_from_the_shared_snapshot(
    serve: Callable[..., ServeProcess], redis_server: str, tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    owner, standby, fence = _owner_and_standby(serve, redis_server, snapshots)
    frames = snapshots / "frames" / "demo"  # evidence frames: on, in the shared folder
    kept_before = wait_for(lambda: sorted(frames.glob("*.jpg")), 30, "a's evidence frames")
    # a frame the owner wrote after its last snapshot (a span no memory will hold), written
    # after b read the folder: b must read the stream's frames again when it adopts it
    future = time.time() + 3600.0
    unsnapshotted = frames / frame_name(future, future + 4.0)
    unsnapshotted.write_bytes(kept_before[0].read_bytes())
    owner.terminate(signal.SIGKILL)
    wait_for(lambda: "adopted stream 'demo'" in standby.output(), 30, "b to adopt the stream")
    new_fence = _owned(standby)["demo"]
    assert new_fence > fence
    assert "restored 'demo'" in standby.output()
    stream = wait_for(lambda: _stream(standby, "demo"), 10, "the stream in b's status")
    failovers = [g for g in stream["gaps"] if g["reason"] == "failover"]
    assert len(failovers) == 1, stream["gaps"]
    assert failovers[0]["end"] > failovers[0]["start"]
    assert not unsnapshotted.exists()  # gone before b ingested anything
    assert kept_before[0].exists()  # the restored memory covers it: kept
    wait_for(lambda: _serving(standby, clips=1), 60, "b to ingest the stream")
    wait_for(lambda: _manifest_fence(snapshots) == new_fence, 30, "b's snapshot with its fence")
    assert standby.terminate() == 0, standby.output()[-3000:]
    assert "Traceback" not in standby.output()


def test_requests_sent_during_a_failover_are_answered_once_by_the_adopter(
    serve: Callable[..., ServeProcess], redis_server: str, tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    owner, standby, fence = _owner_and_standby(serve, redis_server, snapshots)
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.psubscribe(KEYS.reply("*"))
    ids = [f"failover-{index}" for index in range(4)]
    owner.terminate(signal.SIGKILL)

    async def asked() -> list[dict[str, Any]]:
        sends = [
            asyncio.create_task(ask(redis_server, "What?", stream="demo", since="-60s",
                                    request_id=request_id, max_new_tokens=2, timeout_s=90))
            for request_id in ids
        ]  # fmt: skip
        # Every request on the stream while the lease still names the dead owner (or nobody).
        while {json.loads(fields["request"])["id"] for _, fields in client.xrange(KEYS.requests)
               } < set(ids):  # fmt: skip
            await asyncio.sleep(0.05)
        lease = client.get(KEYS.lease("demo"))
        assert lease is None or LeaseRecord.from_json(lease).daemon_id == "a", lease
        return await asyncio.gather(*sends)

    answers = asyncio.run(asked())
    assert "adopted stream 'demo'" in standby.output()
    wait_for(lambda: client.xpending(KEYS.requests, "flashwatch")["pending"] == 0, 30,
             "no request entry left pending")  # fmt: skip
    finals: dict[str, int] = {}
    quiet_until = time.monotonic() + 1.0  # a duplicate final, if any, would be published by now
    while time.monotonic() < quiet_until:
        # None also for the subscribe confirmation (ignored): read on until the deadline.
        if (message := listener.get_message(timeout=0.1)) is None:
            continue
        event = json.loads(message["data"])
        if event.get("type") in ("final", "error") and event["id"] in ids:  # not a part's
            assert event["type"] == "final", event  # no error answer (unknown_stream, ...)
            finals[event["id"]] = finals.get(event["id"], 0) + 1
    assert finals == dict.fromkeys(ids, 1), finals
    for request_id, answer in zip(ids, answers, strict=True):
        stored = json.loads(client.get(KEYS.answer(request_id)))
        assert stored["type"] == "final" and stored["id"] == request_id, stored
        assert stored["daemon"] == answer["daemon"] == "b", stored
        assert any(g["reason"] == "failover" for g in stored["gaps"]), stored["gaps"]
    assert _owned(standby)["demo"] > fence
    stream = wait_for(lambda: _stream(standby, "demo"), 10, "the stream in b's status")
    assert [g["reason"] for g in stream["gaps"]].count("failover") == 1, stream["gaps"]
    listener.close()
    client.close()
    assert standby.terminate() == 0, standby.output()[-3000:]


def test_a_paused_owner_gives_its_stream_up_when_it_wakes(
    serve: Callable[..., ServeProcess], redis_server: str, tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    owner, standby, fence = _owner_and_standby(serve, redis_server, snapshots)
    owner.proc.send_signal(signal.SIGSTOP)
    try:
        new_fence = wait_for(lambda: _owned(standby).get("demo"), 30, "b to adopt the stream")
        assert new_fence > fence
        wait_for(lambda: _manifest_fence(snapshots) == new_fence, 30, "b's first snapshot")
    finally:
        owner.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: "lease of stream 'demo'" in owner.output(), 30, "a to notice")
    lost = [line for line in owner.output().splitlines() if "lease of stream 'demo'" in line]
    assert len(lost) == 1 and "lost" in lost[0], owner.output()[-3000:]

    def gave_up() -> bool:
        status = _status(owner)
        return bool(status and status["fleet"]["leases"] == [] and not status["streams"])

    wait_for(gave_up, 30, "a to stop serving the stream")
    deadline = time.monotonic() + 3 * TTL_S  # both running: only b writes the folder
    while time.monotonic() < deadline:
        assert _manifest_fence(snapshots) == new_fence
        time.sleep(0.2)
    assert _owned(standby).get("demo") == new_fence
    assert owner.terminate() == 0 and standby.terminate() == 0
    assert _manifest_fence(snapshots) == new_fence  # a's clean stop wrote nothing either


def test_placement_auto_balances_and_the_last_daemon_takes_all(
    serve: Callable[..., ServeProcess], redis_server: str, tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    sources = [
        arg
        for i in range(3)  # and the demo stream: four
        for arg in ("--source", f"cam{i}=testsrc://?size=64x48&fps=2")
    ]
    extra = ("--set", "fleet.placement=auto", *sources)
    first = serve(*_args(redis_server, snapshots, "a", *extra))
    wait_for(lambda: len(_owned(first)) == 4, 90, "a alone to take every stream")
    second = serve(*_args(redis_server, snapshots, "b", *extra))

    def balanced() -> bool:
        mine, theirs = _owned(first), _owned(second)
        return len(mine) == len(theirs) == 2

    wait_for(balanced, 90, "the four streams to be balanced two and two")
    assert not set(_owned(first)) & set(_owned(second))
    assert "handed stream" in first.output()
    assert second.terminate() == 0, second.output()[-3000:]
    wait_for(lambda: len(_owned(first)) == 4, 60, "a to take every stream back")
    assert first.terminate() == 0
