"""Reconnect pacing, event windows and connection quality: small pure-ish helpers.

``Backoff`` gives exponential delays with jitter (1 s, 2 s, 4 s … capped, each ±jitter);
``EventWindow`` counts events in a sliding time window (reconnects/stalls in the last hour);
``connection_quality`` turns those counts into the label the status view shows.
"""

from __future__ import annotations

import random
from collections import deque

from streamer.ingest.types import StreamState

HOUR_S = 3600.0


class Backoff:
    """Exponential backoff with multiplicative jitter.

    Delay n (from 0) is ``min(initial * 2**n, maximum) * (1 ± jitter)``, never above ``maximum``.
    """

    def __init__(
        self, initial_s: float, maximum_s: float, jitter: float, rng: random.Random | None = None
    ) -> None:
        self._initial_s = initial_s
        self._maximum_s = maximum_s
        self._jitter = jitter
        self._rng = rng or random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempt

    def next_delay(self) -> float:
        """The next delay in seconds; each call doubles the base up to the cap."""
        base = min(self._initial_s * (2.0 ** min(self._attempt, 62)), self._maximum_s)
        self._attempt += 1
        spread = 1.0 + self._jitter * (2.0 * self._rng.random() - 1.0)
        return min(base * spread, self._maximum_s)

    def reset(self) -> None:
        """Start over at the initial delay (after a healthy connection)."""
        self._attempt = 0


class EventWindow:
    """Timestamps (monotonic seconds) of events within the last ``window_s``; bounded memory."""

    def __init__(self, window_s: float = HOUR_S, max_events: int = 10_000) -> None:
        self._window_s = window_s
        self._times: deque[float] = deque(maxlen=max_events)

    def add(self, now: float) -> None:
        self._times.append(now)

    def count(self, now: float) -> int:
        while self._times and now - self._times[0] > self._window_s:
            self._times.popleft()
        return len(self._times)


def connection_quality(
    state: StreamState, reconnects_last_hour: int, stalls_last_hour: int, ever_live: bool
) -> str:
    """``excellent`` / ``good`` / ``poor`` / ``unusable`` / ``unknown`` for the status view.

    Frigate-style: the fewer reconnects and stalls in the last hour, the better; a stream that is
    down now is ``unusable`` whatever its history.
    """
    if state in (StreamState.FAILED, StreamState.OFFLINE):
        return "unusable"
    if not ever_live:
        return "unknown"
    if state is StreamState.ENDED:
        return "unknown"
    troubles = reconnects_last_hour + stalls_last_hour
    if state in (StreamState.STALLED, StreamState.RECONNECTING) or troubles >= 6:
        return "poor"
    if troubles >= 1:
        return "good"
    return "excellent"


def stall_timeout_s(source_fps: float | None, factor: float, floor_s: float) -> float:
    """Seconds without a decoded frame before a stream counts as stalled: ``max(k/fps, floor)``.

    ``source_fps`` is the source's own frame rate (not the sampling rate); unknown → the floor.
    """
    if source_fps is None or source_fps <= 0.0:
        return floor_s
    return max(factor / source_fps, floor_s)
