"""Reading query requests from Redis into one ``submit`` callback.

Two paths feed the same handler:

* **durable** — the request stream ``<prefix>:requests`` read with a consumer group
  (XREADGROUP). At (re)connect this consumer first drains its own pending entries (read id
  ``0``), then reads new ones (``>``). Entries another consumer left pending longer than
  ``claim_idle_s`` are taken over with XAUTOCLAIM; entries handed to the engine are kept fresh
  (XCLAIM JUSTID to ourselves) while they run, so a long query is not stolen. An entry is XACKed
  by :class:`~sinks.replies.ReplyPublisher` only once its final event is stored.
  Each entry has one field, ``request``, holding the request JSON.
* **quick** — SUBSCRIBE ``<prefix>:ask`` for ``redis-cli PUBLISH`` users. Pub/sub is
  at-most-once (Redis documents it): a request published while the daemon is away or
  reconnecting is lost. ``<prefix>:cancel`` carries request ids to cancel.

Requests are deduplicated by id: a stored answer means "already answered" (ack, no new answer);
a ``seen:<id>`` marker (SET NX, TTL ``dedupe_ttl_s``) says the id is taken by an entry in
progress. Invalid input gets an ``invalid_request`` error event (to ``reply:<entry id>`` when the
request has no usable id) and is acked. Redis going away never ends :meth:`QueryIntake.run`:
every loop reconnects with capped exponential backoff and re-subscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from model.errors import InvalidRequest, QueryError, QueryTimeout
from sinks.connection import REDIS_DOWN_ERRORS, Backoff, open_redis
from sinks.dedupe import Seen, mark_seen, waited_too_long
from sinks.domain import ticket_of
from sinks.redact import redact_url
from sinks.replies import ReplyPublisher
from sinks.schema import (
    ForgetRequest,
    decode_request,
    forgotten_event,
    is_request_id,
    parse_forget,
    parse_request,
    request_id_of,
)
from sinks.settings import Keys, QuerySettings, RedisSettings
from streamer.engine.types import Ticket as QueryTicket

__all__ = ["QueryIntake", "QueryTicket"]

log = logging.getLogger(__name__)

BLOCK_MS = 1000  # XREADGROUP BLOCK: how fast a stopped run() or a dead socket is noticed
PUBSUB_POLL_S = 1.0
HEALTH_CHECK_INTERVAL_S = 15  # PING an idle subscription so a silently dropped one is noticed
MAX_CLAIM_INTERVAL_S = 10.0
MIN_CLAIM_INTERVAL_S = 0.05
AUTOCLAIM_PAGES = 16  # XAUTOCLAIM pages per sweep, so one sweep is bounded
CONSUMER_SWEEP_EVERY = 50  # claim-loop turns between removals of dead, empty consumers
DEAD_CONSUMER_IDLE_S = 3600.0


class QueryIntake:
    """Feeds validated requests to ``submit`` and cancel ids to ``cancel`` until cancelled.

    ``submit`` may raise :class:`model.errors.Busy` (queue full) or another QueryError: the
    request then gets that error event and is acked. ``connected`` is True while both the
    stream reader and the pub/sub subscription are up.
    """

    def __init__(
        self,
        redis: RedisSettings,
        query: QuerySettings,
        *,
        submit: Callable[[QueryTicket], Awaitable[None]],
        cancel: Callable[[str], None],
        forget: Callable[[ForgetRequest], Awaitable[None]] | None = None,
        replies: ReplyPublisher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis_settings = redis
        self._query = query
        self._keys = Keys(redis.prefix)
        self._submit = submit
        self._cancel = cancel
        self._forget = forget
        self._replies = replies
        self._clock = clock
        # Stream entries handed to the engine: entry id -> monotonic time after which we stop
        # refreshing its claim (deadline passed; let it be redelivered if never acked).
        self._in_flight: dict[str, float] = {}
        self._stream_up = False
        self._pubsub_up = False
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "received",
                "submitted",
                "invalid",
                "duplicate",
                "busy",
                "claimed",
                "cancels",
                "reconnects",
                "expired",
                "forgets",
            ),
            0,
        )

    @property
    def connected(self) -> bool:
        return self._stream_up and self._pubsub_up

    @property
    def in_flight_entries(self) -> int:
        """Stream entries handed to the engine and not yet acked (as last seen)."""
        return len(self._in_flight)

    async def run(self) -> None:
        """Serve until cancelled. Redis outages are logged and ridden out, never raised."""
        client = open_redis(
            self._redis_settings,
            read_timeout_s=BLOCK_MS / 1000 + self._redis_settings.connect_timeout_s + 5.0,
            health_check_interval_s=HEALTH_CHECK_INTERVAL_S,
        )
        replies = self._replies or ReplyPublisher(self._redis_settings, self._query)
        log.info(
            "query intake on %s as %s/%s (stream %s, channels %s, %s)",
            redact_url(self._redis_settings.url),
            self._query.consumer_group,
            self._query.consumer_name,
            self._keys.requests,
            self._keys.ask,
            self._keys.cancel,
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._stream_loop(client, replies), name="intake-stream")
                tasks.create_task(self._pubsub_loop(client, replies), name="intake-pubsub")
                tasks.create_task(self._claim_loop(client, replies), name="intake-claim")
        finally:
            self._stream_up = self._pubsub_up = False
            if self._replies is None:
                await replies.aclose()
            await client.aclose()

    # ------------------------------------------------------------------ durable path

    async def _stream_loop(self, client: aioredis.Redis, replies: ReplyPublisher) -> None:
        backoff = Backoff.for_settings(self._redis_settings)
        while True:
            try:
                await self._ensure_group(client)
                was_down = backoff.attempt > 0
                self._stream_up = True
                backoff.reset()
                if was_down:
                    self.counters["reconnects"] += 1
                    log.info("request stream reconnected")
                await self._drain_own_pending(client, replies)
                while True:
                    response = await client.xreadgroup(
                        self._query.consumer_group,
                        self._query.consumer_name,
                        {self._keys.requests: ">"},
                        count=self._query.read_batch,
                        block=BLOCK_MS,
                    )
                    for entry_id, fields in _entries(response):
                        await self._handle_entry(client, replies, entry_id, fields)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:
                self._stream_up = False
                await self._pause("request stream", exc, backoff)
            except Exception:  # a bug must not end the intake; it is logged with its trace
                self._stream_up = False
                log.exception("request stream loop failed; restarting it")
                await asyncio.sleep(backoff.next_delay())

    async def _ensure_group(self, client: aioredis.Redis) -> None:
        try:
            # id 0: a stream that already holds requests (XADDed before any daemon ran) is
            # served from its first entry; answered ones are skipped by deduplication.
            await client.xgroup_create(
                self._keys.requests, self._query.consumer_group, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _drain_own_pending(self, client: aioredis.Redis, replies: ReplyPublisher) -> None:
        """Serve entries delivered to this consumer name earlier and never acked."""
        last_id = "0"
        while True:
            response = await client.xreadgroup(
                self._query.consumer_group,
                self._query.consumer_name,
                {self._keys.requests: last_id},
                count=self._query.read_batch,
            )
            entries = _entries(response)
            if not entries:
                return
            for entry_id, fields in entries:
                if entry_id not in self._in_flight:
                    log.info("serving request entry %s left pending by this consumer", entry_id)
                await self._handle_entry(client, replies, entry_id, fields)
            last_id = entries[-1][0]

    async def _claim_loop(self, client: aioredis.Redis, replies: ReplyPublisher) -> None:
        interval = min(
            MAX_CLAIM_INTERVAL_S, max(MIN_CLAIM_INTERVAL_S, self._query.claim_idle_s / 3)
        )
        turn = 0
        while True:
            await asyncio.sleep(interval)
            turn += 1
            try:
                await self._refresh_in_flight(client)
                await self._autoclaim(client, replies)
                if turn % CONSUMER_SWEEP_EVERY == 0:
                    await self._remove_dead_consumers(client)
                    # Clients that XADD without MAXLEN (redis-cli) must not grow it forever.
                    await client.xtrim(
                        self._keys.requests, maxlen=self._query.stream_maxlen, approximate=True
                    )
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:
                # The stream loop reports outages and recreates the group; just try again.
                log.debug("claim sweep skipped: %s", exc)
            except Exception:
                log.exception("claim sweep failed")

    async def _refresh_in_flight(self, client: aioredis.Redis) -> None:
        """Reset the idle time of our running entries; forget those acked meanwhile."""
        now = time.monotonic()
        for entry_id, stop_at in list(self._in_flight.items()):
            if now > stop_at:
                # Past its deadline and still un-acked (e.g. the final could not be stored):
                # stop refreshing so XAUTOCLAIM redelivers it.
                del self._in_flight[entry_id]
        entry_ids: list[Any] = list(self._in_flight)  # redis-py's invariant list type
        if not entry_ids:
            return
        claimed = await client.xclaim(
            self._keys.requests,
            self._query.consumer_group,
            self._query.consumer_name,
            min_idle_time=0,
            message_ids=entry_ids,
            justid=True,
        )
        still_pending = set(claimed or ())
        for entry_id in entry_ids:
            if entry_id not in still_pending:
                self._in_flight.pop(entry_id, None)

    async def _autoclaim(self, client: aioredis.Redis, replies: ReplyPublisher) -> None:
        """Take over entries idle longer than ``claim_idle_s`` (their consumer died)."""
        start = "0-0"
        for _ in range(AUTOCLAIM_PAGES):
            result = await client.xautoclaim(
                self._keys.requests,
                self._query.consumer_group,
                self._query.consumer_name,
                min_idle_time=int(self._query.claim_idle_s * 1000),
                start_id=start,
                count=self._query.read_batch,
            )
            next_start, entries = result[0], result[1]
            for entry_id, fields in entries:
                if entry_id in self._in_flight:
                    continue
                self.counters["claimed"] += 1
                log.info("claimed request entry %s left idle by another consumer", entry_id)
                await self._handle_entry(client, replies, entry_id, fields)
            if next_start in ("0-0", b"0-0"):
                return
            start = next_start

    async def _remove_dead_consumers(self, client: aioredis.Redis) -> None:
        """Delete consumers with nothing pending and silent for long (old hostname-pid names)."""
        consumers = await client.xinfo_consumers(self._keys.requests, self._query.consumer_group)
        for consumer in consumers:
            name = str(consumer.get("name"))
            if (
                name != self._query.consumer_name
                and consumer.get("pending") == 0
                and consumer.get("idle", 0) > DEAD_CONSUMER_IDLE_S * 1000
            ):
                await client.xgroup_delconsumer(
                    self._keys.requests, self._query.consumer_group, name
                )

    async def _handle_entry(
        self,
        client: aioredis.Redis,
        replies: ReplyPublisher,
        entry_id: str,
        fields: Mapping[str, Any] | None,
    ) -> None:
        if entry_id in self._in_flight:
            return  # ours, still running (seen again through a pending re-read)
        raw = fields.get("request") if fields else None
        if raw is None:
            if not fields:
                # Trimmed by MAXLEN or deleted while pending: nothing left to serve.
                await client.xack(self._keys.requests, self._query.consumer_group, entry_id)
                return
            raw = ""  # an entry without the `request` field: answered as invalid below
        await self._process(client, replies, raw, entry_id)

    # ------------------------------------------------------------------ quick path

    async def _pubsub_loop(self, client: aioredis.Redis, replies: ReplyPublisher) -> None:
        backoff = Backoff.for_settings(self._redis_settings)
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                channels = [self._keys.ask, self._keys.cancel]
                if self._forget is not None:
                    channels.append(self._keys.forget)
                await pubsub.subscribe(*channels)
                if backoff.attempt > 0:
                    log.info("re-subscribed to %s and %s", self._keys.ask, self._keys.cancel)
                self._pubsub_up = True
                backoff.reset()
                while True:
                    message = await pubsub.get_message(timeout=PUBSUB_POLL_S)
                    if message is None:
                        continue
                    channel, data = message.get("channel"), message.get("data")
                    if not isinstance(data, str):
                        continue
                    if channel == self._keys.cancel:
                        self._on_cancel(data)
                    elif channel == self._keys.forget:
                        await self._on_forget(replies, data)
                    elif channel == self._keys.ask:
                        await self._process(client, replies, data, None)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:
                self._pubsub_up = False
                await self._pause("request channel", exc, backoff)
            except Exception:
                self._pubsub_up = False
                log.exception("request channel loop failed; restarting it")
                await asyncio.sleep(backoff.next_delay())
            finally:
                with contextlib.suppress(*REDIS_DOWN_ERRORS):
                    await pubsub.aclose()

    def _on_cancel(self, data: str) -> None:
        request_id = data.strip()
        if not is_request_id(request_id):
            log.warning("ignoring a cancel message that is not a request id")
            return
        self.counters["cancels"] += 1
        try:
            self._cancel(request_id)
        except Exception:
            log.exception("cancel callback failed for %s", request_id)

    async def _on_forget(self, replies: ReplyPublisher, data: str) -> None:
        """Run one forget request and confirm it (or say why not) on its reply channel."""
        assert self._forget is not None
        try:
            request_id = request_id_of(decode_request(data))
        except QueryError:
            request_id = None
        try:
            request = parse_forget(data, self._clock())
            await self._forget(request)
        except QueryError as exc:
            if request_id is not None:
                await replies.reject(request_id, None, exc)
            log.warning("forget request refused: %s", exc)
            return
        self.counters["forgets"] += 1
        log.info(
            "forgot %s from %.3f to %.3f (request %s)",
            request.stream, request.since, request.until, request.id,
        )  # fmt: skip
        await replies.confirm(request.id, forgotten_event(request))

    # ------------------------------------------------------------------ both paths

    async def _process(
        self,
        client: aioredis.Redis,
        replies: ReplyPublisher,
        raw: str,
        entry_id: str | None,
    ) -> None:
        """Validate, deduplicate and submit one request; every failure gets an error event."""
        self.counters["received"] += 1
        received_at = self._clock()
        payload: Any = None
        try:
            payload = decode_request(raw)
            request = parse_request(payload, self._query, now=received_at)
        except InvalidRequest as exc:
            self.counters["invalid"] += 1
            reply_id = request_id_of(payload) or entry_id
            if reply_id is None:
                log.warning("dropping an invalid request without an id (ask channel): %s", exc)
                return
            log.info("invalid request %s: %s", reply_id, exc)
            await replies.reject(reply_id, entry_id, exc)
            return

        if entry_id is not None and waited_too_long(entry_id, request, received_at):
            self.counters["expired"] += 1
            await replies.reject(
                request.id,
                entry_id,
                QueryTimeout("the request waited longer than its deadline_s before it was read"),
            )
            return

        seen = await mark_seen(client, self._keys, self._query, request, entry_id, received_at)
        if seen is not Seen.NEW:
            self.counters["duplicate"] += 1
            log.info("request %s (entry %s) is a duplicate: %s", request.id, entry_id, seen.value)
            if seen is Seen.REUSED:
                await replies.reject(
                    request.id,
                    entry_id,
                    InvalidRequest("request id already used and its answer expired; use a new id"),
                )
            elif entry_id is not None:
                await client.xack(self._keys.requests, self._query.consumer_group, entry_id)
            return

        ticket = ticket_of(request, entry_id, received_at)
        if entry_id is not None:
            self._in_flight[entry_id] = (
                time.monotonic() + request.deadline_s + self._query.claim_idle_s
            )
        try:
            await self._submit(ticket)
        except QueryError as exc:
            self._in_flight.pop(entry_id or "", None)
            if exc.code == "busy":
                self.counters["busy"] += 1
            await replies.fail(ticket, exc)
            return
        except Exception as exc:
            self._in_flight.pop(entry_id or "", None)
            log.exception("submit failed for %s", request.id)
            await replies.fail(ticket, "internal", f"internal error: {type(exc).__name__}")
            return
        self.counters["submitted"] += 1

    async def _pause(self, what: str, exc: BaseException, backoff: Backoff) -> None:
        delay = backoff.next_delay()
        # Warn once per outage, then quietly keep trying.
        level = logging.WARNING if backoff.attempt == 1 else logging.DEBUG
        log.log(
            level,
            "%s: Redis at %s unavailable (%s: %s); retrying in %.1f s",
            what,
            redact_url(self._redis_settings.url),
            type(exc).__name__,
            exc,
            delay,
        )
        await asyncio.sleep(delay)


def _entries(response: Any) -> list[tuple[str, dict[str, Any] | None]]:
    """(entry id, fields) pairs of an XREADGROUP reply, RESP2 (list) or RESP3 (dict)."""
    if not response:
        return []
    streams = response.items() if isinstance(response, dict) else response
    entries: list[tuple[str, dict[str, Any] | None]] = []
    for _name, stream_entries in streams:
        for entry in stream_entries or ():
            entries.append((entry[0], entry[1]))
    return entries
