"""Frame sampling by timestamp (not by frame count), as a small pure state machine.

A source delivers frames at its own, possibly variable, rate; the sampler keeps the first frame
at or after each tick of a ``fps`` grid. Only kept frames are converted and resized, so the cost
of sampling is one comparison per decoded frame.

Timestamps may misbehave: a jump forward (outage, pts jump) restarts the grid at the new time
instead of emitting a burst; a jump backward (pts reset, file loop, clock step) does the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TimestampSampler:
    """Decide, frame by frame, which frames to keep for a ``fps`` sampling rate.

    ``keep(t)`` takes the frame time in seconds (any origin, must be finite).
    """

    fps: float
    # A backward step smaller than this is jitter (VFR, B-frame reordering), not a reset.
    backward_tolerance_s: float = 0.5
    _next_due: float | None = field(default=None, init=False)
    _last: float | None = field(default=None, init=False)

    @property
    def period_s(self) -> float:
        return 1.0 / self.fps

    def keep(self, t: float) -> bool:
        """True if the frame at time ``t`` (seconds) should be kept."""
        period = self.period_s
        last, self._last = self._last, t
        due = self._next_due
        stepped_back = last is not None and t < last - self.backward_tolerance_s
        if due is None or stepped_back or t >= due + period:
            self._next_due = t + period  # (re)start the grid at this frame
            return True
        if t >= due:
            self._next_due = due + period
            return True
        return False

    def reset(self) -> None:
        """Forget the grid (a new connection): the next frame is kept."""
        self._next_due = None
        self._last = None
