"""Against a real RTSP server (gst-rtsp-server in a subprocess, loopback): ingest, a killed and
restarted server, a hung (SIGSTOPped) server, a served file, a 404 path."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from streamer.ingest.settings import IngestSettings, StreamSettings
from streamer.ingest.types import StreamState

pytestmark = pytest.mark.integration

DOWN = (StreamState.RECONNECTING, StreamState.OFFLINE, StreamState.STALLED)


@pytest.fixture
def fast_ingest(fast_ingest: IngestSettings) -> IngestSettings:
    """A 3 s stall floor: quick to detect a hung server, with slack for a loaded CI machine."""
    return fast_ingest.model_copy(update={"stall_floor_s": 3.0})


def rtsp(url: str, **kw: object) -> StreamSettings:
    return StreamSettings(name="cam", url=url, timeout_s=1.0, **kw)  # type: ignore[arg-type]


async def test_live_and_file_mounts(rtsp_server, start_ingest, fast_ingest):
    before = time.time()
    async with (
        start_ingest(rtsp(f"{rtsp_server.url}/live", fps=2.0), fast_ingest) as live,
        start_ingest(rtsp(f"{rtsp_server.url}/file", fps=2.0), fast_ingest) as served,
    ):
        live_clips, file_clips = await asyncio.gather(live.clips(1, 20), served.clips(1, 20))
        stats = live.ingest.stats()
    assert stats.state is StreamState.LIVE and stats.frames_in >= 4
    assert live_clips[0].frames.shape == (4, 32, 32, 3)
    assert before <= live_clips[0].start <= time.time()  # wall clock for live sources
    assert file_clips[0].start >= before


async def test_server_killed_and_restarted_reconnects_with_one_gap(
    rtsp_server, start_ingest, fast_ingest
):
    async with start_ingest(rtsp(f"{rtsp_server.url}/live", fps=2.0), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.LIVE, 20, "live")
        rtsp_server.kill()  # SIGKILL
        killed_at = time.time()
        await run.wait_for(lambda: run.ingest.state in DOWN, 15, "disconnect noticed")
        await asyncio.sleep(1.0)
        rtsp_server.start()
        await run.wait_for(lambda: run.ingest.state is StreamState.LIVE, 30, "live again")
        await run.clips(1, 20)
        stats = run.ingest.stats()
    assert stats.reconnects >= 1
    disconnects = [g for g in run.gaps if g.reason != "dropped"]
    assert len(disconnects) == 1
    gap = disconnects[0]
    assert gap.reason in ("disconnected", "stalled")
    assert gap.start <= killed_at + 0.5 and gap.end >= killed_at + 1.0  # covers the outage


async def test_hung_server_is_detected_then_recovers_after_sigcont(
    rtsp_server, start_ingest, fast_ingest
):
    async with start_ingest(rtsp(f"{rtsp_server.url}/live", fps=2.0), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.LIVE, 20, "live")
        rtsp_server.signal(signal.SIGSTOP)
        # Detection bound: the stall floor (3 s) or the 1 s socket timeout, with slack.
        await run.wait_for(lambda: run.ingest.state in DOWN, 10, "hang detected")
        assert run.ingest.stats().stalls_last_hour + run.ingest.stats().reconnects >= 1
        await asyncio.sleep(1.0)
        rtsp_server.signal(signal.SIGCONT)
        await run.wait_for(lambda: run.ingest.state is StreamState.LIVE, 30, "live after SIGCONT")
        stats = run.ingest.stats()
    assert len([g for g in run.gaps if g.reason != "dropped"]) == 1
    assert stats.quality in ("good", "poor")


async def test_hung_server_recovers_after_restart(rtsp_server, start_ingest, fast_ingest):
    async with start_ingest(rtsp(f"{rtsp_server.url}/live", fps=2.0), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.LIVE, 20, "live")
        rtsp_server.signal(signal.SIGSTOP)
        await run.wait_for(lambda: run.ingest.state in DOWN, 10, "hang detected")
        rtsp_server.kill()
        rtsp_server.start()
        await run.wait_for(lambda: run.ingest.state is StreamState.LIVE, 30, "live after restart")


async def test_unknown_path_is_retried_not_fatal(rtsp_server, start_ingest, fast_ingest):
    async with start_ingest(rtsp(f"{rtsp_server.url}/nope"), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.stats().reconnects >= 2, 20, "retries")
        stats = run.ingest.stats()
    assert stats.state in DOWN
    assert stats.last_error and "404" in stats.last_error
