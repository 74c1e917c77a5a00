"""Helpers for the query-service tests: settings, a fake engine, a running intake."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sinks.connection import open_redis_url
from sinks.intake import QueryIntake
from sinks.replies import ReplyPublisher
from sinks.schema import Answer, QueryTicket, Span
from sinks.settings import QuerySettings, RedisSettings
from streamer.engine.errors import Busy

WAIT_S = 30.0  # upper bound of every wait in these tests (generous: CI machines are shared)


async def wait_until(predicate: Callable[[], Any], timeout_s: float = WAIT_S) -> None:
    """Poll ``predicate`` (sync or async) until truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


def redis_settings(url: str, **overrides: Any) -> RedisSettings:
    fields: dict[str, Any] = {
        "url": url,
        "connect_timeout_s": 1.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3,
    }
    fields.update(overrides)
    return RedisSettings(**fields)


def query_settings(**overrides: Any) -> QuerySettings:
    fields: dict[str, Any] = {"consumer_name": "test-b", "claim_idle_s": 5.0}
    fields.update(overrides)
    return QuerySettings(**fields)


ANSWER_WORDS = ("it", " was", " red")


class FakeEngine:
    """Stands in for the lead's engine: queues tickets and answers them via ReplyPublisher.

    With ``max_queued`` it holds at most that many unanswered tickets: ``room()`` says how many
    more, and a ticket past it gets Busy (as the old engine did for every request), so a test
    sees an intake that reads more than there is room for.
    """

    def __init__(
        self,
        replies: ReplyPublisher,
        *,
        busy: bool = False,
        delay_s: float = 0.0,
        max_queued: int | None = None,
    ):
        self.replies = replies
        self.busy = busy
        self.delay_s = delay_s
        self.max_queued = max_queued
        self.refused = 0
        self.tickets: list[QueryTicket] = []
        self.cancelled: list[str] = []
        self.finished: list[bool] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def room(self) -> int:
        assert self.max_queued is not None
        return max(0, self.max_queued - len(self._tasks))

    async def submit(self, ticket: QueryTicket) -> None:
        if self.busy:
            raise Busy("queue full")
        if self.max_queued is not None and self.room() <= 0:
            self.refused += 1
            raise Busy("queue full")
        self.tickets.append(ticket)
        task = asyncio.get_running_loop().create_task(self._answer(ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def _answer(self, ticket: QueryTicket) -> None:
        await asyncio.sleep(self.delay_s)
        request = ticket.request
        for index, word in enumerate(ANSWER_WORDS):
            await self.replies.token(request.id, index, word)
        answer = Answer(
            id=request.id,
            stream=list(request.stream),
            question=request.question,
            answer="".join(ANSWER_WORDS),
            evidence=[
                Span(stream="cam1", start=20.0, end=30.0),
                Span(stream="cam1", start=0, end=10),
            ],
            frames=8,
            latency_s=0.01,
            ttft_s=0.005,
            tokens=len(ANSWER_WORDS),
            model="fake",
        )
        self.finished.append(await self.replies.finish(ticket, answer))

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks), WAIT_S)


@contextlib.asynccontextmanager
async def running_intake(
    url: str,
    *,
    query: QuerySettings | None = None,
    busy: bool = False,
    delay_s: float = 0.0,
    max_queued: int | None = None,
    wait_connected: bool = True,
) -> AsyncIterator[tuple[QueryIntake, FakeEngine]]:
    """An intake + fake engine serving ``url`` until the block ends."""
    redis = redis_settings(url)
    query = query or query_settings()
    replies = ReplyPublisher(redis, query)
    engine = FakeEngine(replies, busy=busy, delay_s=delay_s, max_queued=max_queued)
    intake = QueryIntake(
        redis,
        query,
        submit=engine.submit,
        cancel=engine.cancel,
        room=engine.room if max_queued is not None else None,
        replies=replies,
    )
    task = asyncio.get_running_loop().create_task(intake.run())
    try:
        if wait_connected:
            await wait_until(lambda: intake.connected or task.done())
            if task.done():
                task.result()  # surface a crash
        yield intake, engine
        await engine.drain()
        assert not task.done(), "intake.run() ended on its own"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT_S)
        await replies.aclose()


class Kit:
    """Everything a sinks test needs, bound to the private redis-server of the test."""

    def __init__(self, server: Any) -> None:
        self.server = server  # RedisServer (.url, .stop(), .start()) or RedisCluster
        self.url: str = server.url
        self.wait_until = wait_until
        self.redis_settings = redis_settings
        self.query_settings = query_settings
        self.FakeEngine = FakeEngine

    def serve(
        self, **kwargs: Any
    ) -> contextlib.AbstractAsyncContextManager[tuple[QueryIntake, FakeEngine]]:
        return running_intake(self.url, **kwargs)

    def client(self) -> Any:
        """A text-mode client of the server (or Cluster) through the project's factory."""
        return open_redis_url(self.url, connect_timeout_s=5.0)


@pytest.fixture
def kit(redis_server_handle: Any) -> Kit:
    return Kit(redis_server_handle)


@pytest.fixture
def cluster_kit(redis_cluster: Any) -> Kit:
    """The same kit on a private three-master Redis Cluster (``kit.server.keyslot(key)``)."""
    return Kit(redis_cluster)
