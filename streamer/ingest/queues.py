"""A bounded queue between pipeline stages, with a named drop policy and drop counters.

``DropQueue[T]`` is consumed on the asyncio event loop and fed either from the loop
(``put_nowait`` / ``put``) or from a worker thread (``put_threadsafe``). Policies:

- ``drop_oldest`` (live sources): a full queue discards its oldest item to take the new one;
  a producer never waits, so memory stays flat when the consumer falls behind.
- ``drop_newest``: a full queue refuses the new item.
- ``block``: the producer waits for room (files read as fast as possible: nothing is lost).

Every drop is counted by reason (``"<name>_full"``) and may be reported to an ``on_drop`` hook.
The items live in one deque under a ``threading.Lock``, so a worker thread puts directly
(no per-item ``call_soon_threadsafe`` callbacks piling up on a busy loop); it schedules at most
one wake-up of the loop at a time.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
DropPolicy = Literal["drop_oldest", "drop_newest", "block"]

_BLOCK_POLL_S = 0.1  # a blocked worker thread re-checks its stop event this often


class DropQueue(Generic[T]):
    """Bounded FIFO with a drop policy; one consumer on the event loop."""

    def __init__(
        self,
        maxsize: int,
        policy: DropPolicy = "drop_oldest",
        *,
        name: str = "queue",
        on_drop: Callable[[T, str], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.policy: DropPolicy = policy
        self.name = name
        self._on_drop = on_drop
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # worker threads blocked on a full queue
        self._drops: Counter[str] = Counter()
        self._puts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_pending = False
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    # ---- introspection ---------------------------------------------------------------------

    def qsize(self) -> int:
        with self._lock:
            return len(self._items)

    def empty(self) -> bool:
        return self.qsize() == 0

    def drops(self) -> dict[str, int]:
        """Drops so far by reason (a copy)."""
        with self._lock:
            return dict(self._drops)

    @property
    def puts(self) -> int:
        """Items accepted so far."""
        return self._puts

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the loop that consumes; needed before ``put_threadsafe``."""
        self._loop = loop

    # ---- producing -------------------------------------------------------------------------

    def put_nowait(self, item: T) -> bool:
        """On the loop thread: add ``item`` now, applying the policy. True if it was queued.

        With ``block`` a full queue raises ``asyncio.QueueFull`` (use ``put``).
        """
        self._bind_running()
        with self._lock:
            if len(self._items) >= self.maxsize and self.policy == "block":
                raise asyncio.QueueFull
            queued, dropped = self._admit(item)
        self._report_drop(dropped)
        self._wake_getters()
        return queued

    async def put(self, item: T) -> bool:
        """Add ``item``; with ``block`` wait for room, otherwise never wait."""
        loop = self._bind_running()
        while self.policy == "block":
            with self._lock:
                if len(self._items) < self.maxsize:
                    break
            waiter: asyncio.Future[None] = loop.create_future()
            self._putters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._putters:
                    self._putters.remove(waiter)
        return self.put_nowait(item)

    def put_threadsafe(self, item: T, *, stop: threading.Event | None = None) -> bool:
        """From a worker thread: add ``item`` (``block`` waits, re-checking ``stop``).

        Returns False if the item was dropped or ``stop`` was set while waiting.
        """
        with self._lock:
            if self.policy == "block":
                while len(self._items) >= self.maxsize:
                    if stop is not None and stop.is_set():
                        return False
                    self._room.wait(_BLOCK_POLL_S)
            queued, dropped = self._admit(item)
            schedule = not self._wake_pending
            self._wake_pending = True
        self._report_drop(dropped)
        if schedule:
            loop = self._loop
            if loop is None:
                raise RuntimeError(f"DropQueue {self.name!r}: bind() a loop before put_threadsafe")
            try:
                loop.call_soon_threadsafe(self._wake_from_thread)
            except RuntimeError:  # the loop is closed: the daemon is shutting down
                return False
        return queued

    def count_drop(self, reason: str, n: int = 1) -> None:
        """Record drops that happened outside the queue (e.g. a corrupt packet upstream)."""
        with self._lock:
            self._drops[reason] += n

    # ---- consuming -------------------------------------------------------------------------

    def get_nowait(self) -> T | None:
        """The oldest item, or None if the queue is empty."""
        with self._lock:
            if not self._items:
                return None
            item = self._items.popleft()
            self._room.notify()
        self._wake_putters()
        return item

    async def get(self) -> T:
        """Wait for and return the oldest item."""
        loop = self._bind_running()
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            waiter: asyncio.Future[None] = loop.create_future()
            self._getters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._getters:
                    self._getters.remove(waiter)

    def clear(self) -> int:
        """Drop everything queued (not counted as drops); returns how many."""
        with self._lock:
            n = len(self._items)
            self._items.clear()
            self._room.notify_all()
        self._wake_putters()
        return n

    # ---- internals -------------------------------------------------------------------------

    def _admit(self, item: T) -> tuple[bool, T | None]:
        """Under the lock: apply the policy. Returns (queued, the item dropped if any)."""
        if len(self._items) < self.maxsize:
            self._items.append(item)
            self._puts += 1
            return True, None
        self._drops[f"{self.name}_full"] += 1
        if self.policy == "drop_newest":
            return False, item
        oldest = self._items.popleft()  # drop_oldest (block never gets here when full)
        self._items.append(item)
        self._puts += 1
        return True, oldest

    def _report_drop(self, dropped: T | None) -> None:
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped, f"{self.name}_full")

    def _bind_running(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        return loop

    def _wake_from_thread(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._wake_getters()

    def _wake_getters(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _wake_putters(self) -> None:
        # Called from the consumer (loop thread); a get from another thread would be unusual.
        while self._putters:
            waiter = self._putters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
