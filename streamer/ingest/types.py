"""Plain data that crosses stage boundaries in the pipeline."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class StreamState(enum.StrEnum):
    CONNECTING = "connecting"
    LIVE = "live"
    STALLED = "stalled"
    RECONNECTING = "reconnecting"
    OFFLINE = "offline"
    ENDED = "ended"
    FAILED = "failed"


class Gate(enum.StrEnum):
    """What a stream's motion gate decided for one clip."""

    OFF = "off"  # the stream is not gated
    FIRST = "first"  # encoded: the first clip after a start, reconnect, hole or drop
    MOTION = "motion"  # encoded: something changed
    KEEPALIVE = "keepalive"  # encoded although static: keepalive_s passed since the last encode
    SKIPPED = "skipped"  # not encoded: nothing changed; memory extends its newest segment

    @property
    def encoded(self) -> bool:
        return self is not Gate.SKIPPED

    @property
    def static(self) -> bool:
        """Nothing changed in this clip (it is recorded as a static span)."""
        return self in (Gate.KEEPALIVE, Gate.SKIPPED)


@dataclass(frozen=True, slots=True)
class Clip:
    """Four sampled frames of one stream, already at the model's square input size."""

    stream: str
    seq: int  # index of this clip within its stream, from 0
    frames: np.ndarray  # [4, S, S, 3] uint8 RGB; [0, S, S, 3] for a skipped (static) clip
    start: float  # seconds: UTC epoch for live sources, media time for files; first frame
    end: float  # seconds: end of the span (last frame time + one sampling period)
    gate: Gate = Gate.OFF  # SKIPPED: not to be encoded, only its span is recorded
    still: np.ndarray | None = None  # [S, S, 3] the middle frame, skipped clips too (evidence)


@dataclass(frozen=True, slots=True)
class MotionStats:
    """An immutable snapshot of one stream's motion gate."""

    clips_skipped: int  # not encoded: static
    clips_keepalive: int  # encoded although static
    clips_motion: int  # encoded because something changed
    clips_first: int  # encoded after a discontinuity
    static_s: float  # stream seconds covered by skipped clips
    motion_fraction: float  # clips with motion among the latest (up to an hour of) clips
    last_score: float  # largest changed-area fraction in the latest clip
    static_since: float | None  # stream time the current static stretch began
    detector_ms_per_frame: float  # detector CPU (thread) time per sampled frame, mean


@dataclass(frozen=True, slots=True)
class GapEvent:
    """An interval of a stream that was not seen (outage, stall, drops, forgotten)."""

    stream: str
    start: float
    end: float
    reason: str  # "disconnected", "stalled", "dropped", "forgotten", ...


@dataclass(frozen=True, slots=True)
class IngestStats:
    """An immutable snapshot of one stream's ingest, for status views."""

    name: str
    url: str  # credentials redacted
    state: StreamState
    fps_in: float  # decoded frames per second, recent
    fps_sampled: float  # frames kept by the sampler per second, recent
    frames_in: int
    frames_sampled: int
    dropped: dict[str, int] = field(default_factory=dict)  # drop reason -> count
    clips: int = 0
    reconnects: int = 0  # total since start
    reconnects_last_hour: int = 0
    stalls_last_hour: int = 0
    quality: str = "unknown"  # "excellent", "good", "poor", "unusable", "unknown"
    last_error: str | None = None
    gaps: int = 0
    motion: MotionStats | None = None  # None when the stream is not gated
