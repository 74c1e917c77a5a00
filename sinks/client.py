"""Asking a running flashwatch daemon from Python scripts (and ``flashwatch ask``/``status``).

    answer = await ask("redis://127.0.0.1:6379/0", "when did the van arrive?", stream="gate")
    async for event in ask_stream(url, "what happened?", since="-15m"):
        print(event["text"] if event["type"] == "token" else event)

The client subscribes to ``reply:<id>`` before it sends the request, so no event can be missed
between the two; if the final publish is missed anyway (a reconnect), the stored copy at
``answer:<id>`` is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from redis.asyncio.client import PubSub

from sinks.connection import (
    JITTER_FRACTION,
    REDIS_DOWN_ERRORS,
    RedisClient,
    describe_redis_error,
    open_pubsub,
    open_redis_url,
    raise_if_cancelled,
)
from sinks.errors import BusError
from sinks.fleet.status import FleetView, read_fleet
from sinks.redact import redact_url
from sinks.replies import RETRYABLE_CODES
from sinks.schema import json_object
from sinks.settings import Keys
from streamer.engine.errors import (
    Busy,
    EmptyMemory,
    InvalidRequest,
    QueryCancelled,
    QueryError,
    QueryTimeout,
    UnknownStream,
)
from streamer.ingest.backoff import Backoff

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 150.0  # a little over the daemon's default deadline_s (120 s)
ANSWER_POLL_S = 1.0  # how often the stored answer is checked while waiting
CONNECT_TIMEOUT_S = 5.0
DEFAULT_STREAM_MAXLEN = 10_000  # matches QuerySettings.stream_maxlen's default

_ERRORS_BY_CODE: dict[str, type[QueryError]] = {
    cls.code: cls
    for cls in (InvalidRequest, UnknownStream, EmptyMemory, Busy, QueryTimeout, QueryCancelled)
}


def error_from_event(event: dict[str, Any]) -> QueryError:
    """The QueryError subclass matching an error event's ``code`` (QueryError if unknown)."""
    code = str(event.get("code", "internal"))
    message = str(event.get("message", code))
    cls = _ERRORS_BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    error = QueryError(message)
    error.code = code  # keep the daemon's code (e.g. "internal") on the instance
    return error


def _client(url: str) -> RedisClient:
    """A client of a single server or a Cluster (``redis+cluster://``), by the URL's scheme."""
    return open_redis_url(url, connect_timeout_s=CONNECT_TIMEOUT_S)


def build_request(
    request_id: str,
    question: str,
    stream: str | list[str],
    since: str | float | None,
    until: str | float | None,
    gen: dict[str, Any],
) -> dict[str, Any]:
    """The request object sent to the daemon (validated there, not here: the daemon's limits
    are configurable, and relative times are resolved against the daemon's clock)."""
    request: dict[str, Any] = {"v": 1, "id": request_id, "stream": stream, "question": question}
    if since is not None:
        request["since"] = since
    if until is not None:
        request["until"] = until
    request.update(gen)
    return request


@contextlib.asynccontextmanager
async def _subscribed(url: str, channel: str) -> AsyncIterator[tuple[RedisClient, PubSub]]:
    """A client subscribed to ``channel``; Redis failures become BusError; both closed after."""
    client = _client(url)
    pubsub: PubSub | None = None
    try:
        pubsub = await open_pubsub(client, ignore_subscribe_messages=True)
        await pubsub.subscribe(channel)
        yield client, pubsub
    except REDIS_DOWN_ERRORS as exc:
        raise BusError(describe_redis_error(exc, url)) from exc
    finally:
        if pubsub is not None:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await pubsub.aclose()
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await client.aclose()


async def ask_stream(
    url: str,
    question: str,
    *,
    stream: str | list[str] = "*",
    since: str | float | None = None,
    until: str | float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    prefix: str = "flashwatch",
    durable: bool = True,
    request_id: str | None = None,
    stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
    **gen: Any,
) -> AsyncGenerator[dict[str, Any], None]:
    """Ask one question; yield token events, then the final or error event, then stop.

    ``durable`` sends on the request stream (at-least-once, survives a daemon restart); False
    publishes on the ask channel (at-most-once) and raises BusError when no daemon listens.
    ``gen``: max_new_tokens, temperature, top_p, deadline_s. Giving ``request_id`` of an
    already answered request returns its stored answer without asking again.
    Raises QueryTimeout when nothing final arrives within ``timeout_s``, BusError when Redis
    cannot be reached.
    """
    request_id = request_id or uuid.uuid4().hex
    keys = Keys(prefix)
    payload = json.dumps(build_request(request_id, question, stream, since, until, gen))
    deadline = time.monotonic() + timeout_s
    async with _subscribed(url, keys.reply(request_id)) as (client, pubsub):
        stored = await _stored_answer(client, keys, request_id)
        if stored is not None and not _retryable(stored):
            yield stored
            return
        if durable:
            await client.xadd(
                keys.requests, {"request": payload}, maxlen=stream_maxlen, approximate=True
            )
        elif await client.publish(keys.ask, payload) == 0:
            raise BusError(f"no daemon is subscribed to {keys.ask}")
        async for event in _reply_events(client, pubsub, keys, request_id, deadline, timeout_s):
            yield event


async def _reply_events(
    client: RedisClient,
    pubsub: PubSub,
    keys: Keys,
    request_id: str,
    deadline: float,
    timeout_s: float,
) -> AsyncIterator[dict[str, Any]]:
    next_poll = time.monotonic() + ANSWER_POLL_S
    last_index = -1
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise QueryTimeout(f"no answer to request {request_id} within {timeout_s:g} s")
        message = await pubsub.get_message(timeout=max(0.0, min(deadline, next_poll) - now))
        raise_if_cancelled()
        event = json_object(message["data"]) if message else None
        if event is not None and event.get("id") == request_id:
            if event.get("type") == "token":
                index = event.get("index")
                if isinstance(index, int) and index > last_index:  # no repeats after a retry
                    last_index = index
                    yield event
                continue
            if event.get("type") in ("final", "error"):
                yield event
                return
        if time.monotonic() >= next_poll:
            stored = await _stored_answer(client, keys, request_id)
            if stored is not None:
                yield stored
                return
            next_poll = time.monotonic() + ANSWER_POLL_S


async def ask(url: str, question: str, **kwargs: Any) -> dict[str, Any]:
    """The final answer object of one question (see :func:`ask_stream` for the arguments).

    Raises the QueryError subclass matching an error event's code (Busy, InvalidRequest,
    UnknownStream, QueryTimeout, ...).
    """
    # aclosing: the subscription is closed here, not whenever the generator is collected.
    async with contextlib.aclosing(ask_stream(url, question, **kwargs)) as events:
        async for event in events:
            if event.get("type") == "final":
                return event
            if event.get("type") == "error":
                raise error_from_event(event)
    raise QueryError("the reply ended without a final event")


async def owners(
    url: str, stream: str | list[str] = "*", *, prefix: str = "flashwatch"
) -> list[tuple[str, str | None, str | None]]:
    """(stream, owner daemon or None, warning or None) per stream, from the fleet's leases.

    ``*`` means every stream some live daemon serves. Raises BusError when Redis cannot be
    reached.
    """
    from sinks.fleet.records import fleet_streams, read_daemons, read_leases
    from sinks.fleet.router import describe_owners

    keys = Keys(prefix)
    client = _client(url)
    try:
        names = (
            list(await fleet_streams(client, keys))
            if stream == "*"
            else ([stream] if isinstance(stream, str) else list(stream))
        )
        leases = await read_leases(client, keys, names)
        alive = await read_daemons(client, keys)
        return describe_owners(names, leases, alive)
    except REDIS_DOWN_ERRORS as exc:
        raise BusError(describe_redis_error(exc, url)) from exc
    finally:
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await client.aclose()


async def forget(
    url: str,
    stream: str,
    since: str | float,
    until: str | float,
    *,
    prefix: str = "flashwatch",
    timeout_s: float = 30.0,
    request_id: str | None = None,
) -> dict[str, Any]:
    """Remove ``[since, until)`` from a stream's memory; returns the daemon's confirmation.

    The forget channel is pub/sub: BusError when no daemon listens; QueryTimeout when no
    confirmation arrives (forgetting is idempotent: send it again); the QueryError of an error
    reply (unknown stream, bad interval).
    """
    request_id = request_id or uuid.uuid4().hex
    keys = Keys(prefix)
    payload = json.dumps(
        {"v": 1, "id": request_id, "stream": stream, "since": since, "until": until}
    )
    deadline = time.monotonic() + timeout_s
    async with _subscribed(url, keys.reply(request_id)) as (client, pubsub):
        if await client.publish(keys.forget, payload) == 0:
            raise BusError(f"no daemon is subscribed to {keys.forget}")
        async for event in _reply_events(client, pubsub, keys, request_id, deadline, timeout_s):
            if event.get("type") == "error":
                raise error_from_event(event)
            return event
    raise QueryTimeout(f"no confirmation of forget request {request_id}")


async def cancel(url: str, request_id: str, *, prefix: str = "flashwatch") -> int:
    """Ask the daemons to cancel a request; returns how many daemons heard it."""
    client = _client(url)
    try:
        return int(await client.publish(Keys(prefix).cancel, request_id))
    except REDIS_DOWN_ERRORS as exc:
        raise BusError(describe_redis_error(exc, url)) from exc
    finally:
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await client.aclose()


async def fetch_status(
    url: str, prefix: str = "flashwatch", once: bool = True, *, timeout_s: float = 5.0
) -> dict[str, Any]:
    """One daemon status snapshot (a DaemonStatus as a dict).

    ``once=True`` returns the stored last snapshot at once when there is one; ``once=False``
    (or no stored snapshot) waits for the next publish. Raises BusError when none arrives
    within ``timeout_s`` or Redis is unreachable.
    """
    keys = Keys(prefix)
    async with _subscribed(url, keys.status) as (client, pubsub):
        if once:
            last = json_object(await client.get(keys.status_last))
            if last is not None:
                return last
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            message = await pubsub.get_message(timeout=remaining)
            raise_if_cancelled()
            snapshot = json_object(message["data"]) if message else None
            if snapshot is not None:
                return snapshot
    raise BusError(f"no status on {keys.status} within {timeout_s:g} s (is a daemon running?)")


async def fetch_fleet(url: str, prefix: str = "flashwatch") -> FleetView:
    """Every daemon and every stream with its owner (see :mod:`sinks.fleet.status`); an empty
    view when no daemon has written a presence record. Raises BusError when Redis is away."""
    client = _client(url)
    try:
        return await read_fleet(client, Keys(prefix))
    except REDIS_DOWN_ERRORS as exc:
        raise BusError(describe_redis_error(exc, url)) from exc
    finally:
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await client.aclose()


async def watch_status(
    url: str,
    prefix: str = "flashwatch",
    *,
    backoff_initial_s: float = 0.5,
    backoff_max_s: float = 10.0,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the stored last snapshot at once, then each published one, forever.

    Rides out Redis outages (reconnects with backoff and re-subscribes); stop by breaking out
    of the loop or cancelling the task.
    """
    keys = Keys(prefix)
    backoff = Backoff(backoff_initial_s, backoff_max_s, jitter=JITTER_FRACTION)
    while True:
        client = _client(url)
        pubsub: PubSub | None = None
        try:
            pubsub = await open_pubsub(client, ignore_subscribe_messages=True)
            await pubsub.subscribe(keys.status)
            backoff.reset()
            last = json_object(await client.get(keys.status_last))
            if last is not None:
                yield last
            while True:
                message = await pubsub.get_message(timeout=1.0)
                raise_if_cancelled()
                snapshot = json_object(message["data"]) if message else None
                if snapshot is not None:
                    yield snapshot
        except REDIS_DOWN_ERRORS as exc:
            delay = backoff.next_delay()
            log.warning("status watch: Redis at %s unavailable (%s)", redact_url(url), exc)
            await asyncio.sleep(delay)
        finally:
            if pubsub is not None:
                with contextlib.suppress(*REDIS_DOWN_ERRORS):
                    await pubsub.aclose()
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await client.aclose()


async def _stored_answer(client: RedisClient, keys: Keys, request_id: str) -> dict[str, Any] | None:
    return json_object(await client.get(keys.answer(request_id)))


def _retryable(event: dict[str, Any]) -> bool:
    return event.get("type") == "error" and event.get("code") in RETRYABLE_CODES


__all__ = [
    "ask",
    "ask_stream",
    "cancel",
    "error_from_event",
    "fetch_fleet",
    "fetch_status",
    "owners",
    "watch_status",
]
