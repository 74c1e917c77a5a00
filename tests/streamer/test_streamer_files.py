"""File and testsrc sources through the whole ingest path, including odd media."""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np

from streamer.ingest.settings import IngestSettings, StreamSettings
from streamer.ingest.types import StreamState


def stream(url: str | Path, **kw: object) -> StreamSettings:
    return StreamSettings(name="s", url=str(url), **kw)  # type: ignore[arg-type]


async def test_file_as_fast_as_possible_uses_media_time(small_mp4, start_ingest, fast_ingest):
    async with start_ingest(stream(small_mp4, fps=2.0, realtime=False), fast_ingest) as run:
        clips = await run.clips(2, timeout=20)
        await run.wait_for(lambda: run.ingest.state is StreamState.ENDED, 20, "ended")
        stats = run.ingest.stats()
    # Frames at k/15 s; kept: 0, 8/15, 15/15, 23/15 → end = last kept frame + 1/fps.
    assert [c.start for c in clips] == [0.0, 2.0]
    assert [c.end for c in clips] == [23 / 15 + 0.5, 53 / 15 + 0.5]
    assert clips[0].frames.shape == (4, 32, 32, 3) and clips[0].frames.dtype == np.uint8
    assert stats.frames_in == 60 and stats.frames_sampled == 8 and stats.clips == 2
    # Sampled by timestamp: frame i has red = 8*i; at 2 fps of a 15 fps file, i = 0, 8 (7.5→8), 15 …
    reds = [int(np.median(f[..., 0])) for f in clips[0].frames]
    assert max(abs(a - b) for a, b in zip(reds, [0, 64, 120, 184], strict=True)) <= 4


async def test_file_url_and_loop(small_mp4, start_ingest, fast_ingest):
    url = f"file://{small_mp4}"
    async with start_ingest(stream(url, fps=1.0, realtime=False, loop=True), fast_ingest) as run:
        clips = await run.clips(3, timeout=20)
    starts = [c.start for c in clips]
    assert starts == sorted(starts) and starts[-1] >= 8.0  # past the 4 s file: looped
    assert run.ingest.stats().state is StreamState.LIVE or run.ingest.stats().clips >= 3


async def test_realtime_file_is_paced(small_mp4, start_ingest, fast_ingest):
    async with start_ingest(stream(small_mp4, fps=4.0, realtime=True), fast_ingest) as run:
        await run.clips(1, timeout=10)
        frames_after_first_clip = run.ingest.stats().frames_in
    # Paced at 15 fps, the first clip (4 frames at 4 fps ≈ 0.75-1 s of media) cannot have
    # pulled in the whole 60-frame file; an unpaced read would have.
    assert frames_after_first_clip < 60


async def test_audio_only_file_fails_clearly(media, tmp_path, start_ingest, fast_ingest):
    path = media.make_audio_only(tmp_path / "audio.m4a")
    async with start_ingest(stream(path), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.FAILED, 10, "failed")
        stats = run.ingest.stats()
    assert "no video" in (stats.last_error or "")
    assert stats.reconnects == 0


async def test_missing_and_truncated_files_fail(small_mp4, tmp_path, start_ingest, fast_ingest):
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(small_mp4.read_bytes()[: small_mp4.stat().st_size // 2])  # no moov
    for path in (tmp_path / "missing.mp4", truncated):
        async with start_ingest(stream(path), fast_ingest) as run:
            await run.wait_for(lambda r=run: r.ingest.state is StreamState.FAILED, 10, "failed")
            assert run.ingest.stats().last_error


async def test_truncated_transport_stream_ends_after_its_frames(
    media, tmp_path, start_ingest, fast_ingest
):
    ts = media.encode_frames(tmp_path / "a.ts", media.pattern_frames(160, 120, 60), 15)
    cut = tmp_path / "cut.ts"
    data = ts.read_bytes()
    cut.write_bytes(data[: (len(data) // 2 // 188) * 188 + 77])  # mid-packet
    async with start_ingest(stream(cut, fps=2.0, realtime=False), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.ENDED, 15, "ended")
        stats = run.ingest.stats()
    assert 10 < stats.frames_in < 60


async def test_resolution_change_and_pts_reset(media, tmp_path, start_ingest, fast_ingest):
    a = media.encode_frames(tmp_path / "a.ts", media.pattern_frames(320, 240, 45), 15, gop=15)
    b = media.encode_frames(tmp_path / "b.ts", media.pattern_frames(176, 144, 45), 15, gop=15)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(a.read_bytes() + b.read_bytes())  # size changes, timestamps restart
    async with start_ingest(
        stream(joined, fps=2.0, realtime=False), fast_ingest, image_size=24
    ) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.ENDED, 15, "ended")
        clips = [c for _ in range(run.ingest.clips.qsize()) if (c := run.ingest.clips.get_nowait())]
        stats = run.ingest.stats()
    assert stats.frames_in >= 85  # (nearly) all 90 frames of both halves decoded
    assert all(c.frames.shape == (4, 24, 24, 3) for c in clips)
    assert len(clips) >= 2
    assert stats.state is StreamState.ENDED and stats.last_error is None


async def test_stream_starting_with_non_key_frames(media, tmp_path, start_ingest, fast_ingest):
    ts = media.encode_frames(tmp_path / "a.ts", media.pattern_frames(160, 120, 60), 15, gop=15)
    data = ts.read_bytes()
    start = (len(data) // 8 // 188) * 188  # inside the first GOP: P-frames before any keyframe
    cut = tmp_path / "nokey.ts"
    cut.write_bytes(data[start:])
    async with start_ingest(stream(cut, fps=2.0, realtime=False), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.ENDED, 15, "ended")
        stats = run.ingest.stats()
    assert stats.clips >= 1 and 0 < stats.frames_in < 60


async def test_corrupt_packets_are_skipped_and_counted(media, tmp_path, start_ingest):
    path = media.encode_frames(tmp_path / "c.mp4", media.pattern_frames(160, 120, 60), 15)
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size, p.is_keyframe) for p in container.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    victims = [p for p in packets if not p[2]][5:45:4]  # 10 P-frames
    for pos, size, _ in victims:
        data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    async with start_ingest(stream(bad, fps=2.0, realtime=False), IngestSettings()) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.ENDED, 15, "ended")
        stats = run.ingest.stats()
    assert stats.dropped.get("corrupt_packets", 0) >= 1
    assert stats.frames_in >= 60 - len(victims) - 2
    assert stats.clips >= 1


async def test_testsrc_live_uses_wall_clock(start_ingest, fast_ingest):
    before = time.time()
    async with start_ingest(stream("testsrc://?size=96x64&fps=20", fps=4.0), fast_ingest) as run:
        clips = await run.clips(2, timeout=10)
        stats = run.ingest.stats()
    assert before - 1 <= clips[0].start < clips[1].start <= time.time()
    assert abs((clips[0].end - clips[0].start) - 1.0) < 0.3  # 4 frames at 4 fps
    assert stats.state is StreamState.LIVE and stats.quality == "excellent"
    assert stats.url == "testsrc://?size=96x64&fps=20"
    assert stats.frames_sampled >= 8 and stats.frames_in > stats.frames_sampled
