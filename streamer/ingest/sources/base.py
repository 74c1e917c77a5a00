"""The one interface every video source implements, and the frame it yields.

A ``Source`` is single-use: one connection attempt. The ingest supervisor builds a fresh one per
attempt and drives it on a dedicated worker thread:

    source.open(stop)            # blocking, bounded by the source's own timeouts
    for frame in source.frames(stop):   # blocking iteration; returns at end of stream
        ...
    source.close()

``open``/``frames`` raise ``SourceUnavailable`` (retrying may help) or ``SourceFatal`` (it cannot).
A return from ``frames`` is the end of the stream: ``ended`` for a file, a disconnect for a live
source. ``stop`` is set by the supervisor to abandon the attempt; sources check it between frames
and while waiting.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from streamer.ingest.settings import Interpolation

MIN_SANE_FPS = 0.05
MAX_SANE_FPS = 300.0


class Frame(ABC):
    """A decoded frame with its timestamp; converted to model input only if the sampler keeps it."""

    __slots__ = ("time",)

    def __init__(self, time: float) -> None:
        self.time = time  # seconds: UTC epoch for live sources, media time for files

    @abstractmethod
    def to_rgb(self, size: int, interpolation: Interpolation) -> np.ndarray:
        """The frame resized (squashed, no crop) to ``[size, size, 3]`` uint8 RGB."""


class AvFrame(Frame):
    """A PyAV frame (any pixel format, any size)."""

    __slots__ = ("frame",)

    def __init__(self, frame: av.VideoFrame, time: float) -> None:
        super().__init__(time)
        self.frame = frame

    def to_rgb(self, size: int, interpolation: Interpolation) -> np.ndarray:
        # One swscale pass does colour conversion and the (anti-aliased, with AREA) resize.
        small = self.frame.reformat(
            width=size, height=size, format="rgb24", interpolation=interpolation
        )
        return small.to_ndarray()


def resize_rgb(rgb: np.ndarray, size: int, interpolation: Interpolation) -> np.ndarray:
    """``[H, W, 3]`` uint8 → ``[size, size, 3]`` uint8 through swscale."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return frame.reformat(width=size, height=size, interpolation=interpolation).to_ndarray()


@dataclass(frozen=True, slots=True)
class SourceTraits:
    """What the supervisor needs to know about a kind of source."""

    live: bool  # wall-clock timestamps, drop-oldest backpressure, EOF = disconnect
    passive: bool = False  # waits for publishers (WHIP): no open deadline; EOF → offline


class Source(ABC):
    """One connection attempt to a video source. See the module docstring for the protocol."""

    traits: SourceTraits

    def __init__(self) -> None:
        self.nominal_fps: float | None = None  # the source's frame rate once open, if known
        self.corrupt_packets = 0  # undecodable packets skipped so far
        self.frames_lost = 0  # frames the source itself dropped (e.g. a WHIP backlog)

    @abstractmethod
    def open(self, stop: threading.Event) -> None:
        """Connect / open; blocking and bounded."""

    @abstractmethod
    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        """Decoded frames in order until the end of the stream or ``stop``."""

    def close(self) -> None:  # noqa: B027  # optional hook: most sources close in frames()
        """Release resources; safe to call more than once, from the worker thread."""


def sane_fps(value: float | None) -> float | None:
    """A reported frame rate, or None if it is missing or absurd."""
    if value is None or not (MIN_SANE_FPS <= value <= MAX_SANE_FPS):
        return None
    return value
