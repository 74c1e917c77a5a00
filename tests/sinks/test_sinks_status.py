"""Status publishing over a real redis-server, the client's status readers, and the TUI."""

from __future__ import annotations

import asyncio
import io
import re
import time
from datetime import datetime
from typing import Any

import pytest
from rich.console import Console

from sinks.client import fetch_status, watch_status
from sinks.errors import BusError
from sinks.schema import (
    DaemonInfo,
    DaemonStatus,
    EncoderStatus,
    GapStatus,
    MemoryStatus,
    QueryStats,
    RedisStatus,
    StreamStatus,
)
from sinks.settings import Keys, StatusSettings
from sinks.status import StatusPublisher
from sinks.timefmt import iso_time
from sinks.tui import LiveView, format_duration, format_time, render_status

pytestmark = pytest.mark.timeout(60)
T0 = 1_764_000_000.0


def make_status(now: float = T0, clips: int = 120) -> DaemonStatus:
    cam = StreamStatus(
        name="frontdoor",
        url="rtsp://admin:hunter2@10.0.0.5/live",
        state="live",
        fps_in=25.0,
        fps_sampled=1.0,
        dropped={"queue_full": 3},
        clips=clips,
        reconnects=2,
        reconnects_last_hour=1,
        stalls_last_hour=0,
        quality="good",
        memory=MemoryStatus(
            tokens=7680,
            budget_tokens=57_600,
            bytes=23_592_960,
            budget_bytes=176_947_200,
            fill=7680 / 57_600,
            span=(now - 480, now),
            levels={0: 110, 1: 5},
            capacity_hours=1.0,
            segments=115,
        ),
        gaps=[GapStatus(start=now - 300, end=now - 240, reason="disconnected")],
    )
    parking = StreamStatus(
        name="parking",
        url="file:///videos/lot.mp4",
        state="reconnecting",
        last_error="connection refused",
    )
    return DaemonStatus(
        time=now,
        daemon=DaemonInfo(
            pid=4242,
            started_at=now - 600,
            uptime_s=600,
            version="0.1.0",
            model="tiny",
            device="cpu",
        ),
        streams=[cam, parking],
        queries=QueryStats(
            pending=1,
            in_flight=1,
            completed=7,
            failed=1,
            latency_p50_s=1.2,
            latency_p95_s=3.4,
            ttft_p95_s=0.5,
        ),
        encoder=EncoderStatus(clips_encoded=120, batches=30, lag_s=0.4, last_batch_ms=85.0),
    )


def publisher_for(kit: Any) -> StatusPublisher:
    return StatusPublisher(kit.redis_settings(kit.url), StatusSettings(last_ttl_s=10))


@pytest.mark.integration
async def test_publish_then_fetch_and_watch(kit: Any) -> None:
    publisher = publisher_for(kit)
    try:
        with pytest.raises(BusError, match="no status"):
            await fetch_status(kit.url, timeout_s=0.3)
        status = make_status()
        assert await publisher.publish(status)
        fetched = await fetch_status(kit.url, "flashwatch")
        assert DaemonStatus.model_validate(fetched) == status
        assert "hunter2" not in str(fetched)
        async with kit.client() as redis:
            assert 0 < await redis.ttl(Keys().status_last) <= 10

        # watch: the stored snapshot at once, then each published one.
        seen: list[dict[str, Any]] = []

        async def watch() -> None:
            async for snapshot in watch_status(kit.url):
                seen.append(snapshot)

        watcher = asyncio.get_running_loop().create_task(watch())
        await kit.wait_until(lambda: len(seen) == 1)
        newer = make_status(now=T0 + 1, clips=121)

        async def published_and_seen() -> bool:
            await publisher.publish(newer)  # the watcher may subscribe a moment later
            return len(seen) >= 2

        await kit.wait_until(published_and_seen)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        assert seen[0]["streams"][0]["clips"] == 120 and seen[-1]["streams"][0]["clips"] == 121

        # once=False waits for a fresh publish instead of the stored one.
        fresh = asyncio.get_running_loop().create_task(fetch_status(kit.url, once=False))
        await asyncio.sleep(0.2)
        assert await publisher.publish(make_status(now=T0 + 2, clips=122))
        assert (await asyncio.wait_for(fresh, 5))["streams"][0]["clips"] == 122
    finally:
        await publisher.aclose()


@pytest.mark.integration
async def test_publish_skips_while_redis_is_away(kit: Any) -> None:
    publisher = publisher_for(kit)
    try:
        kit.server.stop()
        assert await publisher.publish(make_status()) is False
        assert await publisher.publish(make_status()) is False  # within backoff: skipped fast
        assert publisher.skipped == 2 and publisher.published == 0
        kit.server.start()
        await kit.wait_until(lambda: publisher.publish(make_status()))
        assert (await fetch_status(kit.url))["daemon"]["pid"] == 4242
    finally:
        await publisher.aclose()


@pytest.mark.integration
async def test_run_publishes_periodically(kit: Any) -> None:
    publisher = StatusPublisher(
        kit.redis_settings(kit.url), StatusSettings(publish_interval_s=0.05)
    )
    task = asyncio.get_running_loop().create_task(publisher.run(make_status))
    try:
        await kit.wait_until(lambda: publisher.published >= 3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await publisher.aclose()


def render_text(status: DaemonStatus) -> str:
    console = Console(record=True, width=220, file=io.StringIO(), color_system=None)
    console.print(render_status(status))
    return console.export_text()


def test_render_status_shows_streams_states_and_numbers() -> None:
    text = render_text(make_status())
    for needle in (
        "frontdoor",
        "parking",
        "live",
        "reconnecting",
        "connection refused",
        "25.0/1.0 fps",
        "3 dropped",
        "7,680/57,600 tok 13%",
        "1.0 h",
        "disconnected",
        "1 pending",
        "7 done",
        "p95 3.4s",
        "TTFT 0.5s",
        "lag 0.4s",
        "pid 4242",
        "0:10:00",
    ):
        assert needle in text, needle
    assert "hunter2" not in text


def three_streams_one_failed() -> DaemonStatus:
    status = make_status()
    failed = StreamStatus(
        name="backyard",
        url="rtsp://cam:pw@10.0.0.9/live",
        state="failed",
        last_error="401 Unauthorized: check the user name and password in the stream URL",
    )
    redis = RedisStatus(
        state="auth_failed",
        url="redis://:hunter2@127.0.0.1:6379/0",
        last_error="Redis at redis://:***@127.0.0.1:6379/0: authentication failed",
    )
    return status.model_copy(update={"streams": (*status.streams, failed), "redis": redis})


def render_80x24(status: DaemonStatus) -> list[str]:
    console = Console(width=80, height=24, record=True, file=io.StringIO(), color_system=None)
    console.print(render_status(status, console.height))
    return console.export_text().rstrip("\n").splitlines()


def test_the_live_view_fits_80x24_with_three_streams() -> None:
    lines = render_80x24(three_streams_one_failed())
    text = "\n".join(lines)
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    for needle in ("frontdoor live", "parking reconnecting", "backyard failed", "401 Unauth",
                   "auth_failed", "queries", "encoder", "lag 0.4s"):  # fmt: skip
        assert needle in text, needle
    assert "hunter2" not in text and " pw@" not in text
    words = set(text.replace("…", " ").split())
    for line in lines:  # a cut line ends in an ellipsis; no line starts with half a word
        inner = line.strip("│╭╮╰╯─ ")
        assert not inner or inner.split()[0].rstrip("…") in words


def test_the_live_view_sums_up_streams_that_do_not_fit() -> None:
    status = three_streams_one_failed()
    many = (
        tuple(status.streams[0].model_copy(update={"name": f"cam{i}"}) for i in range(12))
        + status.streams[1:]
    )
    lines = render_80x24(status.model_copy(update={"streams": many}))
    text = "\n".join(lines)
    assert len(lines) <= 24
    assert "backyard failed" in text and "parking reconnecting" in text  # troubles stay
    assert "+6 more (live)" in text
    assert "queries" in lines[-3] and "encoder" in lines[-2]


def test_render_status_without_streams_or_memory() -> None:
    status = make_status().model_copy(update={"streams": ()})
    assert "(no streams)" in render_text(status)


def test_time_formatting() -> None:
    now = time.time()
    assert format_time(now, now).count(":") == 2 and "-" not in format_time(now, now)
    assert format_time(now - 3 * 86400, now).startswith(time.strftime("%Y", time.localtime()))
    assert format_time(75.0) == "0:01:15"  # media time of a file source
    assert format_duration(90061) == "1d 1:01:01"


def test_cli_times_are_iso_8601_with_the_local_offset() -> None:
    shown = iso_time(T0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", shown), shown
    assert datetime.fromisoformat(shown).timestamp() == T0
    assert iso_time(75.0) == "0:01:15"  # seconds into a file stay a duration


async def test_live_view_starts_and_stops() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    snapshots: list[DaemonStatus] = []
    view = LiveView(
        lambda: snapshots[-1] if snapshots else None, console=console, refresh_per_second=20
    )
    view.start()
    await asyncio.sleep(0.1)
    snapshots.append(make_status())
    deadline = time.monotonic() + 5
    while "frontdoor" not in out.getvalue() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    view.stop()
    await asyncio.wait_for(view.wait_closed(), 5)
    assert "starting… waiting for the first status" in out.getvalue()
    assert "frontdoor" in out.getvalue()
