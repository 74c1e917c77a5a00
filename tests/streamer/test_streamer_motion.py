"""Motion gating: the detector, the gate, and both on PyAV-made camera videos through ingest."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from media import CLOCK_MASK, camera_scene, encode_frames
from pydantic import ValidationError
from rich.console import Console

from sinks.schema import StreamStatus
from sinks.tui import render_stream
from streamer.app.daemon import motion_status
from streamer.ingest.clips import ClipAssembler, SampledFrame
from streamer.ingest.motion import MotionDetector, MotionGate, mask_image, motion_enabled
from streamer.ingest.settings import IngestSettings, MotionSettings, StreamSettings
from streamer.ingest.types import Clip, Gate

FPS_FILE = 8
FPS_SAMPLED = 2.0  # a clip is 2 s
SECONDS = 40
MOTION = ((12.0, 16.0), (28.0, 30.0))  # a person crosses the frame, seconds of media time
SIZE = 64  # the model's input size in these tests


def object_at(t: float) -> float | None:
    for t0, t1 in MOTION:
        if t0 <= t < t1:
            return (t - t0) / (t1 - t0)
    return None


@pytest.fixture(scope="module")
def camera_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 s of a static camera with a ticking clock; someone walks by at 12-16 s and 28-30 s."""
    path = tmp_path_factory.mktemp("motion") / "camera.mp4"
    frames = (
        camera_scene(160, 120, i / FPS_FILE, object_at=object_at(i / FPS_FILE))
        for i in range(SECONDS * FPS_FILE)
    )
    return encode_frames(path, frames, FPS_FILE)


def gated(url: Path, **motion: object) -> StreamSettings:
    settings = MotionSettings.model_validate({"enabled": True, "min_area": 0.001, **motion})
    return StreamSettings(
        name="cam", url=str(url), fps=FPS_SAMPLED, realtime=False, motion=settings
    )


def overlaps_motion(clip: Clip) -> bool:
    return any(clip.start < t1 and clip.end > t0 for t0, t1 in MOTION)


def long_after_motion(clip: Clip) -> bool:
    """Static, and not in the clip right after a burst (the background may still settle)."""
    return not overlaps_motion(clip) and not any(t1 <= clip.start < t1 + 2.0 for _, t1 in MOTION)


async def ingest_all(start_ingest, stream: StreamSettings, ingest: IngestSettings) -> list[Clip]:
    n = int(SECONDS * FPS_SAMPLED) // 4
    async with start_ingest(stream, ingest, image_size=SIZE) as run:
        clips = await run.clips(n, timeout=120)
        stats = run.ingest.stats()
    assert stats.motion is not None and stats.motion.detector_ms_per_frame > 0.0
    skipped = sum(1 for c in clips if c.gate is Gate.SKIPPED)
    assert stats.motion.clips_skipped == skipped
    return clips


# ---- on a PyAV-made camera video, through ingest ------------------------------------------


async def test_masked_clock_never_counts_and_motion_is_encoded_at_once(
    camera_mp4, start_ingest, fast_ingest
):
    stream = gated(camera_mp4, keepalive_s=8.0, masks=[list(CLOCK_MASK)])
    clips = await ingest_all(start_ingest, stream, fast_ingest)
    assert clips[0].gate is Gate.FIRST
    for clip in clips:
        if overlaps_motion(clip):  # motion start included: encoded at once, in full
            assert clip.gate is Gate.MOTION, clip
            assert clip.frames.shape == (4, SIZE, SIZE, 3)
        elif long_after_motion(clip) and clip.seq > 0:
            assert clip.gate in (Gate.SKIPPED, Gate.KEEPALIVE), clip
    skipped = [c for c in clips if c.gate is Gate.SKIPPED]
    assert len(skipped) >= len(clips) // 2
    assert all(c.frames.shape[0] == 0 for c in skipped)  # nothing to encode travels


async def test_unmasked_clock_counts_as_motion(camera_mp4, start_ingest, fast_ingest):
    # The same video without the mask: the ticking clock alone is over min_area, so the mask
    # is what keeps static clips from being encoded in the test above.
    clips = await ingest_all(start_ingest, gated(camera_mp4, keepalive_s=8.0), fast_ingest)
    static = [c for c in clips if long_after_motion(c) and c.seq > 0]
    moving = [c for c in static if c.gate is Gate.MOTION]
    assert len(moving) >= len(static) // 2


async def test_keepalive_encodes_a_static_scene_on_time(camera_mp4, start_ingest, fast_ingest):
    keepalive = 6.0
    stream = gated(camera_mp4, keepalive_s=keepalive, masks=[list(CLOCK_MASK)])
    clips = await ingest_all(start_ingest, stream, fast_ingest)
    last_encoded = None
    keepalives = 0
    for clip in clips:
        if clip.gate is Gate.SKIPPED:
            assert last_encoded is not None and clip.start - last_encoded < keepalive
            continue
        if clip.gate is Gate.KEEPALIVE:
            keepalives += 1
            assert last_encoded is not None and clip.start - last_encoded >= keepalive
        last_encoded = clip.start
    assert keepalives >= 2  # static stretches of 12 s and 10 s at 6 s keep-alive


async def test_gating_off_by_default_for_files(camera_mp4, start_ingest, fast_ingest):
    stream = StreamSettings(name="cam", url=str(camera_mp4), fps=FPS_SAMPLED, realtime=False)
    async with start_ingest(stream, fast_ingest, image_size=SIZE) as run:
        clips = await run.clips(3, timeout=60)
        assert run.ingest.stats().motion is None
    assert all(c.gate is Gate.OFF and c.frames.shape[0] == 4 for c in clips)


# ---- the detector -------------------------------------------------------------------------


def scene(t: float, **kw: object) -> np.ndarray:
    img = camera_scene(80, 64, t, **kw)  # type: ignore[arg-type]
    return np.ascontiguousarray(img[:, 8:72])  # square, like a sampled frame


def test_thresholds_on_area_and_pixel_delta() -> None:
    base = scene(0.0, clock=False)
    settings = MotionSettings(enabled=True, min_area=0.01, pixel_threshold=25)
    detector = MotionDetector(settings, SIZE)
    assert detector.score(base) == 0.0  # the first frame sets the background
    assert detector.score(base) == 0.0
    small = base.copy()
    small[10:14, 10:14] = 0  # 16 of 4096 pixels: 0.4 % < 1 %
    big = base.copy()
    big[10:26, 10:26] = 0  # 256 pixels: 6 %
    assert 0.0 < detector.score(small) < 0.01
    assert detector.score(big) >= 0.01
    faint = np.clip(base.astype(int) + 10, 0, 255).astype(np.uint8)  # +10 grey < 25
    fresh = MotionDetector(settings, SIZE)
    fresh.score(base)
    assert fresh.score(faint) == 0.0
    strong = np.clip(base.astype(int) + 60, 0, 255).astype(np.uint8)
    assert fresh.score(strong) > 0.5


def test_slow_lighting_drift_is_not_motion() -> None:
    detector = MotionDetector(MotionSettings(enabled=True), SIZE)
    # 30 % brighter over 300 frames (5 min at 1 fps): the background follows the drift.
    scores = [detector.score(scene(i, light=1.0 + 0.001 * i, clock=False)) for i in range(300)]
    assert max(scores) < MotionSettings().min_area


def test_mask_polygons_in_normalised_coordinates() -> None:
    settings = MotionSettings(masks=[[(0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0)]])
    keep = mask_image(settings, 64, 64)
    assert keep is not None and keep.shape == (64, 64)
    assert not keep[:, :31].any() and keep[:, 33:].all()  # the left half is ignored
    detector = MotionDetector(settings, SIZE)
    base = scene(0.0, clock=False)
    detector.score(base)
    left = base.copy()
    left[:, :30] = 255 - left[:, :30]  # big change, all inside the mask
    assert detector.score(left) == 0.0


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError):
        MotionSettings(masks=[[(0.0, 0.0), (1.0, 0.0)]])  # two points are not a polygon
    with pytest.raises(ValidationError):
        MotionSettings(masks=[[(0.0, 0.0), (1.5, 0.0), (1.0, 1.0)]])  # outside 0..1
    with pytest.raises(ValidationError):
        MotionSettings(keepalive_s=1.0)  # shorter than a clip
    with pytest.raises(ValidationError):
        MotionSettings.model_validate({"treshold": 3})  # unknown key


@pytest.mark.parametrize(
    ("url", "enabled", "expected"),
    [
        ("rtsp://cam.local/stream1", "auto", True),
        ("RTSPS://cam.local/stream1", "auto", True),
        ("rtmp://live.example/app", "auto", False),
        ("https://example.com/live.m3u8", "auto", False),
        ("whip://", "auto", False),
        ("/videos/a.mp4", "auto", False),
        ("testsrc://?fps=5", "auto", False),
        ("/videos/a.mp4", True, True),
        ("rtsp://cam.local/stream1", False, False),
    ],
)
def test_on_for_cameras_off_for_broadcasts_and_files(url: str, enabled: object, expected: bool):
    stream = StreamSettings(
        name="s", url=url, motion=MotionSettings.model_validate({"enabled": enabled})
    )
    assert motion_enabled(stream) is expected


# ---- the gate (pure) ----------------------------------------------------------------------


def decide_all(gate: MotionGate, moves: list[bool], clip_s: float = 4.0) -> list[Gate]:
    return [
        gate.decide(i * clip_s, (i + 1) * clip_s, [0.5 if m else 0.0] * 4)
        for i, m in enumerate(moves)
    ]


def test_gate_keepalive_and_motion_start() -> None:
    gate = MotionGate(MotionSettings(keepalive_s=16.0))
    moves = [False] * 6 + [True, True] + [False] * 6
    got = decide_all(gate, moves)
    F, M, K, S = Gate.FIRST, Gate.MOTION, Gate.KEEPALIVE, Gate.SKIPPED
    assert got == [F, S, S, S, K, S, M, M, S, S, S, K, S, S]
    stats = gate.stats(0.0, 0)
    assert (stats.clips_skipped, stats.clips_keepalive, stats.clips_motion) == (9, 2, 2)
    assert stats.motion_fraction == pytest.approx(2 / 14)
    assert stats.static_s == pytest.approx(9 * 4.0)
    assert stats.static_since == pytest.approx(32.0)  # still static since the burst ended


def test_gate_encodes_after_a_discontinuity() -> None:
    gate = MotionGate(MotionSettings())
    assert gate.decide(0.0, 4.0, [0.0] * 4) is Gate.FIRST
    assert gate.decide(4.0, 8.0, [0.0] * 4) is Gate.SKIPPED
    assert gate.decide(20.0, 24.0, [0.0] * 4) is Gate.FIRST  # a hole: memory must not stretch
    assert gate.decide(24.0, 28.0, [0.0] * 4) is Gate.SKIPPED
    gate.reset()  # a dropped clip or a reconnect
    assert gate.decide(28.0, 32.0, [0.0] * 4) is Gate.FIRST


def test_assembler_flush_resets_the_gate() -> None:
    gate = MotionGate(MotionSettings())
    assembler = ClipAssembler("cam", 1.0, gate=gate)
    frame = np.zeros((SIZE, SIZE, 3), np.uint8)
    clips = [assembler.add(SampledFrame(1, float(t), frame)) for t in range(8)]
    made = [c for c in clips if c is not None]
    assert [c.gate for c in made] == [Gate.FIRST, Gate.SKIPPED]
    assert made[1].frames.shape == (0, SIZE, SIZE, 3)
    assembler.flush()
    later = [assembler.add(SampledFrame(1, float(t), frame)) for t in range(8, 12)]
    assert later[-1] is not None and later[-1].gate is Gate.FIRST


# ---- visible in status and the live view --------------------------------------------------


def test_status_and_live_view_show_the_gate() -> None:
    gate = MotionGate(MotionSettings(keepalive_s=16.0))
    decide_all(gate, [False] * 6 + [True, True] + [False] * 6)
    fields = motion_status(gate.stats(0.01, 56), encode_ms_per_clip=250.0)
    status = StreamStatus.model_validate(
        {
            "name": "cam",
            "url": "rtsp://u:secret@cam/1",
            "state": "live",
            "clips": 14,
            "motion": fields,
        }
    )
    assert status.motion is not None
    assert status.motion.clips_skipped == 9
    assert status.motion.encoder_saved_s == pytest.approx(9 * 0.25)
    text = render_text(status)
    assert "9 static skipped" in text and "14% motion" in text and "2s saved" in text
    assert motion_status(None, 250.0) is None


def render_text(status: StreamStatus) -> str:
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(render_stream(status, 0.0))
    return console.export_text()
