"""Clip assembly: sampled frames → 4-frame ``Clip``s with their time span.

Pure state (no I/O): ``ClipAssembler.add`` returns a finished clip every 4th frame. A clip never
spans a discontinuity: a new connection (``epoch``) or a hole longer than ``max_hole_periods``
sampling periods discards the partial clip, and ``discarded`` counts those frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.ingest.types import Clip

FRAMES_PER_CLIP = 4  # VideoChat-Flash encodes 4-frame clips


@dataclass(frozen=True, slots=True)
class SampledFrame:
    """One kept frame, already at the model's square input size."""

    epoch: int  # connection attempt it came from; a new epoch breaks clip continuity
    time: float  # seconds: UTC epoch (live) or media time (files)
    rgb: np.ndarray  # [S, S, 3] uint8


class ClipAssembler:
    """Group consecutive sampled frames of one stream into clips of ``FRAMES_PER_CLIP``."""

    def __init__(self, stream: str, fps: float, max_hole_periods: float = 3.0) -> None:
        self._stream = stream
        self._period_s = 1.0 / fps
        self._max_hole_s = max_hole_periods / fps
        self._pending: list[SampledFrame] = []
        self._seq = 0
        self.discarded = 0  # frames thrown away with an unfinished clip

    @property
    def clips_made(self) -> int:
        return self._seq

    def add(self, frame: SampledFrame) -> Clip | None:
        """Add one frame; return the clip it completes, if any."""
        if self._pending:
            last = self._pending[-1]
            hole = frame.time - last.time
            if frame.epoch != last.epoch or hole > self._max_hole_s or hole < 0.0:
                self.flush()
        self._pending.append(frame)
        if len(self._pending) < FRAMES_PER_CLIP:
            return None
        frames = self._pending
        self._pending = []
        clip = Clip(
            stream=self._stream,
            seq=self._seq,
            frames=np.stack([f.rgb for f in frames]),  # [4, S, S, 3]
            start=frames[0].time,
            end=frames[-1].time + self._period_s,
        )
        self._seq += 1
        return clip

    def flush(self) -> int:
        """Discard the unfinished clip; returns how many frames were dropped."""
        n = len(self._pending)
        self.discarded += n
        self._pending = []
        return n
