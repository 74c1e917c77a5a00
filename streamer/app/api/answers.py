"""Where the engine's replies go: Redis for Redis requests, the asker for HTTP requests.

:class:`AnswerHub` is the engine's ``Replies``. Events of a request that came over HTTP are
delivered to its :class:`Subscription` (and never published on Redis, so ``/v1/ask`` works
while Redis is down); everything else is forwarded to the Redis ``ReplyPublisher``. Every final
event, whoever asked, is kept (bounded, newest first out last) for ``GET /v1/answers/{id}``,
and counted with its latency for the metrics.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from sinks.domain import wire_answer
from sinks.metrics import LATENCY_BUCKETS_S, Histogram
from sinks.schema import error_event, final_event, token_event
from streamer.engine.errors import Busy, InvalidRequest, QueryError
from streamer.engine.outbox import Replies
from streamer.engine.types import Answer, Ticket

MAX_TOKENS_WAITING = 4096  # per subscription; beyond it token events are dropped (counted)


class Subscription:
    """The events of one HTTP request, in order: token dicts, then one final or error dict."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._tokens: deque[dict[str, Any]] = deque()
        self._final: dict[str, Any] | None = None
        self._wakeup = asyncio.Event()
        self.dropped = 0

    @property
    def finished(self) -> bool:
        """The final (or error) event has arrived."""
        return self._final is not None

    def push_token(self, event: dict[str, Any]) -> bool:
        if len(self._tokens) >= MAX_TOKENS_WAITING:
            self.dropped += 1
            return False
        self._tokens.append(event)
        self._wakeup.set()
        return True

    def push_final(self, event: dict[str, Any]) -> None:
        self._final = event
        self._wakeup.set()

    async def next_event(self) -> dict[str, Any]:
        """The next event; the final one last (wait with a timeout around this)."""
        while True:
            if self._tokens:
                return self._tokens.popleft()
            if self._final is not None:
                return self._final
            self._wakeup.clear()
            await self._wakeup.wait()

    async def final(self) -> dict[str, Any]:
        """Skip the tokens; the final (or error) event."""
        while self._final is None:
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._final


class AnswerHub(Replies):
    def __init__(self, redis: Replies, *, keep: int, max_subscribers: int) -> None:
        self._redis = redis
        self._keep = keep
        self._max_subscribers = max_subscribers
        # HTTP request ids whose final has not come yet; None once the asker went away (its
        # events are then discarded, never published on Redis).
        self._local: dict[str, Subscription | None] = {}
        self._finals: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.answered = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.tokens_dropped = 0
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.ttft = Histogram(LATENCY_BUCKETS_S)

    # ---- HTTP side ----------------------------------------------------------------------

    def subscribe(self, request_id: str) -> Subscription:
        """Register an HTTP request before it is submitted; raises Busy or InvalidRequest."""
        if request_id in self._local or request_id in self._finals:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if len(self._local) >= self._max_subscribers:
            raise Busy(f"{len(self._local)} HTTP requests already waiting; try again later")
        subscription = Subscription(request_id)
        self._local[request_id] = subscription
        return subscription

    def unsubscribe(self, request_id: str, *, submitted: bool) -> None:
        """The asker left. A submitted request's remaining events are discarded when they come."""
        if request_id not in self._local:
            return
        if submitted:
            self._local[request_id] = None
        else:
            del self._local[request_id]

    def answer(self, request_id: str) -> dict[str, Any] | None:
        """A kept final (or error) event, as sent."""
        return self._finals.get(request_id)

    # ---- the engine's Replies -------------------------------------------------------------

    async def token(self, request_id: str, index: int, text: str) -> None:
        if request_id not in self._local:
            await self._redis.token(request_id, index, text)
            return
        subscription = self._local[request_id]
        if subscription is not None and not subscription.push_token(
            json.loads(token_event(request_id, index, text))
        ):
            self.tokens_dropped += 1

    async def finish(self, ticket: Ticket, answer: Answer) -> None:
        self.answered += 1
        self.latency.observe(answer.latency_s)
        if answer.ttft_s is not None:
            self.ttft.observe(answer.ttft_s)
        await self._final(
            ticket, json.loads(final_event(wire_answer(answer))), self._redis.finish, answer
        )

    async def fail(self, ticket: Ticket, error: QueryError) -> None:
        self.failed += 1
        self.errors[error.code] += 1
        event = json.loads(error_event(ticket.request.id, error.code, str(error) or error.code))
        await self._final(ticket, event, self._redis.fail, error)

    async def _final(
        self,
        ticket: Ticket,
        event: dict[str, Any],
        forward: Callable[[Ticket, Any], Awaitable[None]],
        arg: Any,
    ) -> None:
        request_id = ticket.request.id
        self._finals[request_id] = event
        self._finals.move_to_end(request_id)
        while len(self._finals) > self._keep:
            self._finals.popitem(last=False)
        if request_id in self._local:
            subscription = self._local.pop(request_id)
            if subscription is not None:
                subscription.push_final(event)
            return
        await forward(ticket, arg)
