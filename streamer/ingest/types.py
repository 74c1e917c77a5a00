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


@dataclass(frozen=True, slots=True)
class Clip:
    """Four sampled frames of one stream, already at the model's square input size."""

    stream: str
    seq: int  # index of this clip within its stream, from 0
    frames: np.ndarray  # [4, S, S, 3] uint8 RGB
    start: float  # seconds: UTC epoch for live sources, media time for files; first frame
    end: float  # seconds: end of the span (last frame time + one sampling period)


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
