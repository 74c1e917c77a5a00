"""Pure pieces: timestamp sampler, clip assembly, backoff, quality, stall timeout, redaction,
settings validation, the testsrc pattern."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from pydantic import ValidationError

from sinks.redact import redact_text, redact_url
from streamer.ingest.backoff import Backoff, EventWindow, connection_quality, stall_timeout_s
from streamer.ingest.clips import FRAMES_PER_CLIP, ClipAssembler, SampledFrame
from streamer.ingest.errors import SourceFatal
from streamer.ingest.sampler import TimestampSampler
from streamer.ingest.settings import IngestSettings, StreamSettings, WhipSettings
from streamer.ingest.sources.testsrc import parse_testsrc_url, render_pattern
from streamer.ingest.types import StreamState


def kept(sampler: TimestampSampler, times: list[float]) -> list[float]:
    return [t for t in times if sampler.keep(t)]


def test_sampler_keeps_one_frame_per_period_at_any_frame_rate() -> None:
    for source_fps in (7.0, 25.0, 29.97, 60.0):
        times = [i / source_fps for i in range(int(source_fps * 20))]
        out = kept(TimestampSampler(fps=1.0), times)
        assert len(out) == 20
        assert all(0.0 <= b - a - 1.0 < 1.0 / source_fps + 1e-9 for a, b in itertools.pairwise(out))


def test_sampler_variable_frame_rate() -> None:
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.uniform(0.01, 0.2, 400)).tolist()  # 5..100 fps, ~42 s
    out = kept(TimestampSampler(fps=2.0), times)
    span = times[-1] - times[0]
    assert abs(len(out) - span * 2.0) <= 2
    # On a fixed grid: spacing deviates from the period by at most one source frame interval.
    assert all(0.5 - 0.2 - 1e-9 <= b - a <= 0.5 + 0.2 + 1e-9 for a, b in itertools.pairwise(out))


def test_sampler_forward_jump_restarts_grid_without_burst() -> None:
    s = TimestampSampler(fps=1.0)
    times = [i / 10 for i in range(30)] + [100.0 + i / 10 for i in range(30)]
    out = kept(s, times)
    assert out == pytest.approx([0.0, 1.0, 2.0, 100.0, 101.0, 102.0])


def test_sampler_pts_reset_backwards() -> None:
    s = TimestampSampler(fps=1.0)
    times = [50 + i / 10 for i in range(25)] + [i / 10 for i in range(25)]
    assert kept(s, times) == pytest.approx([50.0, 51.0, 52.0, 0.0, 1.0, 2.0])


def frame(t: float, epoch: int = 1) -> SampledFrame:
    return SampledFrame(epoch, t, np.full((8, 8, 3), int(t) % 256, np.uint8))


def test_clip_span_and_order() -> None:
    asm = ClipAssembler("cam", fps=2.0)
    clips = [c for t in np.arange(0, 4, 0.5) if (c := asm.add(frame(float(t)))) is not None]
    assert [c.seq for c in clips] == [0, 1]
    assert clips[0].frames.shape == (FRAMES_PER_CLIP, 8, 8, 3)
    assert (clips[0].start, clips[0].end) == (0.0, 2.0)  # last frame 1.5 + 1/fps
    assert (clips[1].start, clips[1].end) == (2.0, 4.0)


def test_clip_never_spans_a_reconnect_or_hole() -> None:
    asm = ClipAssembler("cam", fps=1.0)
    assert asm.add(frame(0.0)) is None
    assert asm.add(frame(1.0)) is None
    assert asm.add(frame(2.0, epoch=2)) is None  # new connection: the two frames are discarded
    assert asm.discarded == 2
    for t in (3.0, 4.0):
        assert asm.add(frame(t, epoch=2)) is None
    assert asm.add(frame(30.0, epoch=2)) is None  # a hole of 26 periods
    assert asm.discarded == 5
    clip = None
    for t in (31.0, 32.0, 33.0):
        clip = asm.add(frame(t, epoch=2))
    assert clip is not None and (clip.start, clip.end) == (30.0, 34.0)


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = Backoff(1.0, 30.0, 0.2, random.Random(0))
    delays = [b.next_delay() for _ in range(8)]
    for n, d in enumerate(delays):
        base = min(2.0**n, 30.0)
        assert base * 0.8 - 1e-9 <= d <= min(base * 1.2, 30.0) + 1e-9
    assert max(delays) <= 30.0
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay() <= 1.2


def test_event_window_forgets_old_events() -> None:
    w = EventWindow(window_s=10.0)
    for t in (0.0, 1.0, 5.0, 12.0):
        w.add(t)
    assert w.count(12.0) == 2
    assert w.count(100.0) == 0


def test_quality_and_stall_timeout() -> None:
    assert connection_quality(StreamState.LIVE, 0, 0, True) == "excellent"
    assert connection_quality(StreamState.LIVE, 1, 1, True) == "good"
    assert connection_quality(StreamState.LIVE, 5, 3, True) == "poor"
    assert connection_quality(StreamState.OFFLINE, 0, 0, True) == "unusable"
    assert connection_quality(StreamState.CONNECTING, 0, 0, False) == "unknown"
    assert stall_timeout_s(30.0, 10.0, 2.0) == 2.0
    assert stall_timeout_s(1.0, 10.0, 2.0) == 10.0
    assert stall_timeout_s(None, 10.0, 2.0) == 2.0


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:hunter2@10.1.2.3:554/s1", "rtsp://***@10.1.2.3:554/s1"),
        ("rtsp://admin@cam/s1", "rtsp://***@cam/s1"),
        ("https://h/live.m3u8?token=abc&q=1", "https://h/live.m3u8?token=***&q=***"),
        ("testsrc://?size=320x240&fps=10", "testsrc://?size=320x240&fps=10"),
        ("/data/a b.mp4", "/data/a b.mp4"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_masks_urls_inside_messages_and_secrets() -> None:
    msg = "Server returned 401 Unauthorized: 'rtsp://u:s3cr3t@h/x' (token tok-123)"
    out = redact_text(msg, ("tok-123",))
    assert "s3cr3t" not in out and "tok-123" not in out
    assert "rtsp://***@h/x" in out


def test_settings_forbid_unknown_keys_and_check_bounds() -> None:
    with pytest.raises(ValidationError):
        StreamSettings(name="a", url="testsrc://", fpss=2)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        StreamSettings(name="bad name!", url="testsrc://")
    with pytest.raises(ValidationError):
        StreamSettings(name="a", url="testsrc://", fps=0)
    with pytest.raises(ValidationError):
        IngestSettings(backoff_initial_s=10, backoff_max_s=1)
    with pytest.raises(ValidationError, match="token"):
        WhipSettings(host="0.0.0.0")
    assert WhipSettings(host="0.0.0.0", token="t").token is not None
    assert "sekrit" not in repr(WhipSettings(token="sekrit-token"))  # SecretStr hides it


def test_testsrc_options_and_pattern() -> None:
    o = parse_testsrc_url("testsrc://?size=64x48&fps=5&duration=2")
    assert (o.width, o.height, o.fps, o.duration_s) == (64, 48, 5.0, 2.0)
    with pytest.raises(SourceFatal):
        parse_testsrc_url("testsrc://?size=huge")
    with pytest.raises(SourceFatal):
        parse_testsrc_url("testsrc://?colour=red")
    a, b = render_pattern(320, 240, 1000.0), render_pattern(320, 240, 1001.0)
    assert a.shape == (240, 320, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b)  # it moves
    assert not np.array_equal(a[:20, :120], b[:20, :120])  # the burned-in clock changed
    assert np.array_equal(a, render_pattern(320, 240, 1000.0))  # deterministic
