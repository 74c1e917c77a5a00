"""Replies leave the engine through an ordered outbox with its own task.

Publishing can be slow (a Redis outage makes a final answer retry for up to
``final_store_deadline_s``); the engine must never wait for it, or encoding would stall behind
a reply. The outbox keeps the order of one query's events (tokens, then its final event) and
is bounded where it may drop: token events beyond ``max_tokens`` waiting are dropped and
counted; final events are never dropped (there are at most as many as queries admitted).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from streamer.engine.errors import QueryError
from streamer.engine.types import Answer, Ticket

log = logging.getLogger(__name__)


class Replies(Protocol):
    """Where answers go (``sinks.replies.ReplyPublisher``; tests use an in-memory one).

    Speaks the engine's domain types; the publisher converts them to the wire format.."""

    async def token(self, request_id: str, index: int, text: str) -> None: ...
    async def finish(self, ticket: Ticket, answer: Answer) -> None: ...
    async def fail(self, ticket: Ticket, error: QueryError) -> None: ...


@dataclass(frozen=True, slots=True)
class _Token:
    request_id: str
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class _Final:
    ticket: Ticket
    result: Answer | QueryError


class ReplyOutbox:
    def __init__(self, replies: Replies, *, max_tokens: int = 4096) -> None:
        self._replies = replies
        self._max_tokens = max_tokens
        self._events: deque[_Token | _Final] = deque()
        self._tokens_waiting = 0
        self._wakeup = asyncio.Event()
        self.tokens_dropped = 0

    def token(self, request_id: str, index: int, text: str) -> None:
        if self._tokens_waiting >= self._max_tokens:
            self.tokens_dropped += 1
            return
        self._tokens_waiting += 1
        self._push(_Token(request_id, index, text))

    def finish(self, ticket: Ticket, answer: Answer) -> None:
        self._push(_Final(ticket, answer))

    def fail(self, ticket: Ticket, error: QueryError) -> None:
        self._push(_Final(ticket, error))

    @property
    def waiting(self) -> int:
        return len(self._events)

    async def run(self) -> None:
        """Publish events in order until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.flush()

    async def flush(self) -> None:
        """Publish everything waiting now (also used at shutdown)."""
        while self._events:
            event = self._events.popleft()
            try:
                if isinstance(event, _Token):
                    self._tokens_waiting -= 1
                    await self._replies.token(event.request_id, event.index, event.text)
                elif isinstance(event.result, Answer):
                    await self._replies.finish(event.ticket, event.result)
                else:
                    await self._replies.fail(event.ticket, event.result)
            except Exception:  # one bad event must not stop every later reply
                log.exception("publishing a reply failed; it is dropped")

    def _push(self, event: _Token | _Final) -> None:
        self._events.append(event)
        self._wakeup.set()
