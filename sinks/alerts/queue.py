"""What every delivery channel shares: a bounded drop-oldest queue and its counters.

``offer`` never blocks: a full queue drops its oldest event (an alert from long ago matters
less than the one just decided) and counts it. A channel's ``run`` task takes events one at a
time with :meth:`AlertQueue.get` and delivers them in order; while one is retried the others
wait behind it, bounded by the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from sinks.redact import redact_text
from streamer.engine.standing.events import AlertEvent

LAST_ERROR_CHARS = 300  # the longest error text kept for status


@dataclass(frozen=True, slots=True)
class Queued:
    """An event waiting in a channel, and when it was offered (monotonic seconds)."""

    event: AlertEvent
    offered_at: float


class AlertQueue:
    """A bounded FIFO of alert events with drop-oldest, and the counters status shows.

    ``secrets`` are masked in every error text it keeps (``note_error``).
    """

    def __init__(self, channel: str, size: int, secrets: tuple[str, ...] = ()) -> None:
        self.channel = channel
        self._items: deque[Queued] = deque()
        self._size = size
        self._secrets = secrets
        self._ready = asyncio.Event()
        self._current: Queued | None = None  # taken by ``get``, not settled yet
        self._abandoned: set[str] = set()  # queued when it was closed
        self.closed = False
        self.offered = 0
        self.delivered = 0
        self.retried = 0  # attempts that failed and were tried again
        self.dropped = 0  # pushed out of a full queue, or offered after close
        self.failed = 0  # given up on (refused for good, out of attempts or too old)
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # epoch seconds
        self.last_delivered_at: float | None = None  # epoch seconds

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: AlertEvent) -> bool:
        """Queue ``event``; False (counted dropped) when closed. Never blocks."""
        if self.closed:
            self.dropped += 1
            return False
        if len(self._items) >= self._size:
            self._items.popleft()
            self.dropped += 1
        self._items.append(Queued(event, time.monotonic()))
        self.offered += 1
        self._ready.set()
        return True

    async def get(self) -> Queued:
        """The oldest waiting event; waits for one. Taking the next settles the one before
        (delivered, given up on or put back)."""
        self._current = None
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        self._current = self._items.popleft()
        return self._current

    def unsettled(self) -> set[str]:
        """Ids of the events queued or being delivered: not delivered, not given up on."""
        ids = {item.event.alert_id for item in self._items} | self._abandoned
        if self._current is not None:
            ids.add(self._current.event.alert_id)
        return ids

    def put_back(self, item: Queued) -> None:
        """Return an event taken by ``get`` to the head (its delivery was interrupted); if the
        queue filled up meanwhile, it is the oldest and is dropped."""
        self._current = None
        if len(self._items) >= self._size:
            self.dropped += 1
            return
        self._items.appendleft(item)
        self._ready.set()

    def note_delivered(self) -> None:
        self._current = None
        self.delivered += 1
        self.last_delivered_at = time.time()

    def note_error(self, text: str) -> str:
        """Keep ``text`` (secrets masked, one line, bounded) as the last error; returns it."""
        shown = redact_text(" ".join(text.split()), self._secrets)[:LAST_ERROR_CHARS]
        self.last_error = shown
        self.last_error_at = time.time()
        return shown

    def close(self) -> int:
        """Refuse further offers; drop (and count) the events still queued; returns how many."""
        self.closed = True
        self._abandoned = self.unsettled()  # never delivered: still owed (the manager's outbox)
        left = len(self._items)
        self.dropped += left
        self._items.clear()
        return left

    def stats(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "queued": len(self._items),
            "offered": self.offered,
            "delivered": self.delivered,
            "retried": self.retried,
            "dropped": self.dropped,
            "failed": self.failed,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_delivered_at": self.last_delivered_at,
        }
