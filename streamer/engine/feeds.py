"""The engine's inputs: each stream's clip queue, and gap events waiting for their turn.

A gap (an outage) must reach the memory after the clips queued before it and before the clips
that came after it; otherwise, when encoding is behind, the older clips would be refused as
"not newer than the memory" and their video lost. So a clip that starts at or after a waiting
gap is held back until that gap has been applied. Event-loop only (no locks).

``wait`` lets an idle engine sleep until a clip arrives (no polling): it takes the first clip
of whichever queue gets one and keeps it at the head of that stream's feed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip, GapEvent

_EPS_S = 1e-6


class ClipFeeds:
    def __init__(self) -> None:
        self._queues: dict[str, DropQueue[Clip]] = {}
        self._held: dict[str, Clip] = {}  # the head of a stream's feed, out of its queue
        self._gaps: dict[str, deque[GapEvent]] = {}
        self._next = 0  # round-robin position

    def add(self, name: str, clips: DropQueue[Clip]) -> None:
        self._queues[name] = clips
        self._gaps[name] = deque()

    def remove(self, name: str) -> None:
        """Stop feeding ``name``: its waiting clips and gaps are discarded."""
        self._queues.pop(name, None)
        self._held.pop(name, None)
        self._gaps.pop(name, None)

    def streams(self) -> list[str]:
        return list(self._queues)

    def record_gap(self, event: GapEvent) -> None:
        gaps = self._gaps.get(event.stream)
        if gaps is not None:  # a stream removed meanwhile (live reconfiguration) has none
            gaps.append(event)

    def waiting(self) -> bool:
        """Whether any clip waits (possibly behind a gap that is due)."""
        return bool(self._held) or any(not q.empty() for q in self._queues.values())

    def take(self, limit: int) -> list[Clip]:
        """Up to ``limit`` clips, round-robin across streams, never past a waiting gap."""
        names = list(self._queues)
        batch: list[Clip] = []
        idle: set[str] = set()
        while names and len(batch) < limit and len(idle) < len(names):
            name = names[self._next % len(names)]
            self._next += 1
            if name in idle:
                continue
            clip = self._held.pop(name, None) or self._queues[name].get_nowait()
            if clip is None:
                idle.add(name)
                continue
            gaps = self._gaps[name]
            if gaps and clip.start >= gaps[0].start - _EPS_S:
                self._held[name] = clip  # after the gap: wait until it is applied
                idle.add(name)
                continue
            batch.append(clip)
        return batch

    def drop_stream(self, name: str) -> int:
        """Discard what waits for ``name`` (a failed stream); returns how many clips."""
        held = 1 if self._held.pop(name, None) is not None else 0
        return held + self._queues[name].clear()

    def due_gaps(self) -> list[GapEvent]:
        """Gaps whose older clips have all been taken; they leave the feed."""
        due: list[GapEvent] = []
        for name, gaps in self._gaps.items():
            held = self._held.get(name)
            while gaps and (
                (held is not None and gaps[0].start <= held.start + _EPS_S)
                or (held is None and self._queues[name].empty())
            ):
                due.append(gaps.popleft())
        return due

    async def wait(self) -> None:
        """Return once a clip waits in some feed (at once if one already does)."""
        if self.waiting():
            return
        getters = {asyncio.ensure_future(queue.get()): name for name, queue in self._queues.items()}
        if not getters:
            await asyncio.Event().wait()  # no sources: only cancellation ends this
        try:
            await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for getter in getters:
                # DropQueue.get takes its item only after it wakes, so cancelling a getter
                # that has not finished loses nothing.
                if not getter.done():
                    getter.cancel()
            for getter, name in getters.items():
                with contextlib.suppress(asyncio.CancelledError):
                    self._held[name] = await getter  # a clip taken is kept, even when cancelled
