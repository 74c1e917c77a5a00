"""Clip assembly: sampled frames → 4-frame ``Clip``s with their time span.

Pure state (no I/O): ``ClipAssembler.add`` returns a finished clip every 4th frame. A clip never
spans a discontinuity: a new connection (``epoch``) or a hole longer than ``max_hole_periods``
sampling periods discards the partial clip, and ``discarded`` counts those frames. With a motion
gate, every clip carries the gate's decision; a skipped clip carries no frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.ingest.motion import MotionGate
from streamer.ingest.types import Clip, Gate

FRAMES_PER_CLIP = 4  # VideoChat-Flash encodes 4-frame clips
STILL_INDEX = FRAMES_PER_CLIP // 2  # the frame kept as a clip's evidence picture


@dataclass(frozen=True, slots=True)
class SampledFrame:
    """One kept frame, already at the model's square input size."""

    epoch: int  # connection attempt it came from; a new epoch breaks clip continuity
    time: float  # seconds: UTC epoch (live) or media time (files)
    rgb: np.ndarray  # [S, S, 3] uint8
    motion: float = 0.0  # changed-area fraction from the stream's motion detector (0..1)


class ClipAssembler:
    """Group consecutive sampled frames of one stream into clips of ``FRAMES_PER_CLIP``."""

    def __init__(
        self,
        stream: str,
        fps: float,
        max_hole_periods: float = 3.0,
        *,
        gate: MotionGate | None = None,
    ) -> None:
        self._stream = stream
        self._gate = gate
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
        start, end = frames[0].time, frames[-1].time + self._period_s
        gate = Gate.OFF
        if self._gate is not None:
            gate = self._gate.decide(start, end, [f.motion for f in frames])
        pixels = (
            np.stack([f.rgb for f in frames])  # [4, S, S, 3]
            if gate.encoded
            else np.empty((0, *frames[0].rgb.shape), np.uint8)  # nothing to encode
        )
        # the evidence frame: a view, no copy (the stacked pixels, or the skipped clip's frame)
        still = pixels[STILL_INDEX] if gate.encoded else frames[STILL_INDEX].rgb
        clip = Clip(self._stream, self._seq, pixels, start, end, gate, still)
        self._seq += 1
        return clip

    def flush(self) -> int:
        """Discard the unfinished clip; returns how many frames were dropped."""
        n = len(self._pending)
        self.discarded += n
        self._pending = []
        if self._gate is not None:
            self._gate.reset()  # the next clip starts a new stretch: encode it
        return n
