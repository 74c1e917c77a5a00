"""The supervisor: faults are answered (never fatal unless retrying cannot help), backpressure
keeps memory flat, and one bad stream never holds up the others."""

from __future__ import annotations

import asyncio
import logging

from streamer.ingest.settings import StreamSettings
from streamer.ingest.types import StreamState

DOWN = (StreamState.RECONNECTING, StreamState.OFFLINE, StreamState.STALLED)


def stream(url: str, name: str = "s", **kw: object) -> StreamSettings:
    return StreamSettings(name=name, url=url, **kw)  # type: ignore[arg-type]


async def test_refused_port_retries(start_ingest, fast_ingest, tcp_misbehaver):
    probe = tcp_misbehaver("silent")
    port = probe.port
    probe.close()  # nothing listens there any more: connection refused
    url = f"rtsp://viewer:pa55word@127.0.0.1:{port}/cam"
    async with start_ingest(stream(url, timeout_s=1.0), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.stats().reconnects >= 3, 20, "3 reconnects")
        stats = run.ingest.stats()
    assert stats.state in DOWN
    assert stats.last_error and "refused" in stats.last_error.lower()
    assert "pa55word" not in stats.url and "pa55word" not in stats.last_error
    assert stats.url == f"rtsp://***@127.0.0.1:{port}/cam"  # the whole userinfo
    assert run.gaps == []  # never seen: no hole in any history


async def test_hung_peer_times_out_and_goes_offline(start_ingest, fast_ingest, tcp_misbehaver):
    peer = tcp_misbehaver("silent")
    url = f"rtsp://127.0.0.1:{peer.port}/cam"
    async with start_ingest(stream(url, timeout_s=0.5), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.stats().reconnects >= 1, 15, "a reconnect")
        await run.wait_for(lambda: run.ingest.state is StreamState.OFFLINE, 15, "offline")
        stats = run.ingest.stats()
    # FFmpeg reports a silent RTSP peer as a timeout or as "invalid data" (no reply): either way
    # the open gave up on its own instead of blocking forever.
    assert stats.last_error
    assert stats.quality == "unusable"


async def test_garbage_peer_is_a_retryable_fault(start_ingest, fast_ingest, tcp_misbehaver):
    peer = tcp_misbehaver("junk")
    async with start_ingest(
        stream(f"rtsp://127.0.0.1:{peer.port}/x", timeout_s=1.0), fast_ingest
    ) as run:
        await run.wait_for(lambda: run.ingest.stats().reconnects >= 2, 20, "2 reconnects")
        stats = run.ingest.stats()
    assert stats.state in DOWN and stats.last_error


async def test_401_fails_without_retrying_and_hides_the_password(
    start_ingest, fast_ingest, tcp_misbehaver, caplog
):
    caplog.set_level(logging.DEBUG)
    camera = tcp_misbehaver("auth")
    url = f"rtsp://admin:hunter2@127.0.0.1:{camera.port}/cam"
    async with start_ingest(stream(url, timeout_s=2.0), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.FAILED, 15, "failed")
        await asyncio.sleep(0.5)
        stats = run.ingest.stats()
    assert stats.reconnects == 0
    assert stats.last_error and "401" in stats.last_error
    assert "hunter2" not in stats.last_error and "hunter2" not in stats.url
    assert "401" in caplog.text and "hunter2" not in caplog.text
    assert stats.quality == "unusable"


async def test_unknown_scheme_option_fails_fast(start_ingest, fast_ingest):
    async with start_ingest(stream("testsrc://?size=nonsense"), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.FAILED, 5, "failed")


async def test_backpressure_drops_oldest_clips_and_reports_a_gap(start_ingest, fast_ingest):
    settings = stream("testsrc://?size=64x48&fps=40", fps=20.0, queue_clips=2, queue_frames=4)
    async with start_ingest(settings, fast_ingest, image_size=16) as run:
        # Nobody consumes clips: 5 clips/s arrive, the queue holds 2.
        await run.wait_for(
            lambda: run.ingest.stats().dropped.get("clips_full", 0) >= 5, 15, "drops"
        )
        assert run.ingest.clips.qsize() == 2
        assert run.ingest.state is StreamState.LIVE  # the decoder thread never blocked
    stats = run.ingest.stats()
    dropped_gaps = [g for g in run.gaps if g.reason == "dropped"]
    assert len(dropped_gaps) == 1  # one contiguous run of dropped clips, reported once
    assert dropped_gaps[0].end - dropped_gaps[0].start >= 5 * 0.2 - 1e-6
    remaining = [run.ingest.clips.get_nowait(), run.ingest.clips.get_nowait()]
    assert remaining[0].seq < remaining[1].seq == stats.clips - 1  # newest clips were kept


async def test_batch_source_blocks_instead_of_dropping(start_ingest, fast_ingest):
    """realtime=False: the producer waits for the consumer; nothing is dropped, nothing stalls."""
    settings = stream(
        "testsrc://?size=64x48&fps=30&duration=6", fps=10.0, realtime=False, queue_clips=1
    )
    async with start_ingest(settings, fast_ingest, image_size=16) as run:
        got = []
        while len(got) < 15:
            got.append(await asyncio.wait_for(run.ingest.clips.get(), 10))
            await asyncio.sleep(0.05)  # slow consumer
        await run.wait_for(lambda: run.ingest.state is StreamState.ENDED, 10, "ended")
        stats = run.ingest.stats()
    assert [c.seq for c in got] == list(range(15))
    assert "clips_full" not in stats.dropped and "frames_full" not in stats.dropped
    assert stats.reconnects == 0 and stats.stalls_last_hour == 0


async def test_one_bad_stream_does_not_hold_up_the_others(
    start_ingest, fast_ingest, tcp_misbehaver
):
    peer = tcp_misbehaver("silent")
    good = [stream("testsrc://?size=64x48&fps=10", name=f"good{i}", fps=4.0) for i in range(2)]
    bad = stream(f"rtsp://127.0.0.1:{peer.port}/hang", name="bad", timeout_s=3.0)
    async with (
        start_ingest(bad, fast_ingest) as hung,
        start_ingest(good[0], fast_ingest) as a,
        start_ingest(good[1], fast_ingest) as b,
    ):
        # While the bad stream sits in a blocking open (3 s), the good ones deliver clips
        # at their normal pace: 3 clips of 1 s each.
        clips_a, clips_b = await asyncio.gather(a.clips(3, timeout=8), b.clips(3, timeout=8))
        assert hung.ingest.state is not StreamState.LIVE
        await hung.wait_for(lambda: hung.ingest.stats().reconnects >= 1, 15, "bad stream retry")
    assert [c.seq for c in clips_a] == [0, 1, 2] and [c.seq for c in clips_b] == [0, 1, 2]
    assert a.ingest.stats().reconnects == 0 and b.ingest.stats().reconnects == 0
