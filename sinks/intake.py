"""Reading query requests from Redis into one ``submit`` callback.

Two paths feed the same handler:

* **durable** — the request stream ``<prefix>:requests`` read with a consumer group
  (XREADGROUP). The stream is the queue: the intake reads only as many entries as the engine
  has room for (``room()``), so every request is eventually answered (a final, ``timeout`` past
  its own deadline, or a typed error), never ``busy``. At (re)connect this consumer first
  drains its own pending entries (read id ``0``), then reads new ones (``>``). Entries another
  consumer left pending longer than ``claim_idle_s`` are taken over with XAUTOCLAIM; entries
  handed to the engine are kept fresh (XCLAIM JUSTID to ourselves) while they run, so a long
  query is not stolen. An entry is XACKed by :class:`~sinks.replies.ReplyPublisher` only once
  its final event is stored. Each entry has one field, ``request``, holding the request JSON.
* **quick** — SUBSCRIBE ``<prefix>:ask`` for ``redis-cli PUBLISH`` users. Pub/sub is
  at-most-once (Redis documents it): a request published while the daemon is away or
  reconnecting is lost; past the engine's queue bound it gets ``busy``. ``<prefix>:cancel``
  carries request ids to cancel, ``<prefix>:forget`` forget requests.

No input can wedge anything: everything is read as raw bytes and decoded per field, with JSON
depth and number sizes bounded (:func:`sinks.schema.decode_request`); any failure on one entry
or message becomes a typed error reply on it (``invalid_request``, or ``internal`` for a bug),
and the entry is acked. An entry delivered more than ``max_deliveries`` times (XPENDING's
counter: its handling keeps crashing or its reply cannot be stored) is copied to the
dead-letter stream ``<prefix>:requests:dead`` with the reason, answered ``internal`` and acked.

In a fleet, a request naming streams other daemons own goes to the ``router``
(:mod:`sinks.fleet.router`) once its id is taken; its entry stays pending (its claim refreshed)
until the router stores the merged final. A daemon's second intake reads its fleet inbox
(``stream_key``; no channels): the sub-requests coordinators route to it, acked there.

Requests are deduplicated by id (:mod:`sinks.dedupe`). Redis going away never ends
:meth:`QueryIntake.run`: every loop reconnects with capped exponential backoff and
re-subscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from redis.asyncio.client import PubSub
from redis.exceptions import ResponseError

from sinks.connection import (
    REDIS_DOWN_ERRORS,
    RedisClient,
    open_pubsub,
    open_redis,
    raise_if_cancelled,
    redis_backoff,
)
from sinks.dedupe import Seen, entry_added_at, is_answered, mark_seen, waited_too_long
from sinks.domain import ticket_of
from sinks.redact import redact_url
from sinks.replies import ReplyPublisher
from sinks.schema import (
    ForgetRequest,
    QueryRequest,
    decode_request,
    forgotten_event,
    is_request_id,
    one_line,
    parse_forget,
    parse_request,
    request_id_of,
    salvage_request_id,
)
from sinks.settings import Keys, QuerySettings, RedisSettings
from streamer.engine.errors import Busy, InvalidRequest, QueryError, QueryTimeout
from streamer.engine.types import Ticket as QueryTicket
from streamer.ingest.backoff import Backoff

__all__ = ["QueryIntake", "QueryTicket", "Router"]

log = logging.getLogger(__name__)

BLOCK_MS = 1000  # XREADGROUP BLOCK: how fast a stopped run() or a dead socket is noticed
PUBSUB_POLL_S = 1.0
HEALTH_CHECK_INTERVAL_S = 15  # PING an idle subscription so a silently dropped one is noticed
MAX_CLAIM_INTERVAL_S = 10.0
MIN_CLAIM_INTERVAL_S = 0.05
AUTOCLAIM_PAGES = 16  # XAUTOCLAIM pages per sweep, so one sweep is bounded
CONSUMER_SWEEP_EVERY = 50  # claim-loop turns between removals of dead consumers and trims
DEAD_CONSUMER_IDLE_S = 3600.0
ROOM_POLL_S = 0.05  # how often a full engine is asked again for room
QUEUE_STATS_INTERVAL_S = 2.0  # refresh of the pending / waiting / dead-letter counts
REQUEST_FIELD = b"request"

Fields = Mapping[bytes, bytes]


class Router(Protocol):
    """Where requests naming streams of other daemons go (``sinks.fleet.router.FleetRouter``)."""

    async def takes(self, request: QueryRequest) -> bool:
        """True when the request names a stream this daemon does not own."""
        ...

    async def coordinate(
        self, request: QueryRequest, entry_id: str | None, received_at: float
    ) -> None:
        """Start answering it from its owners (returns once started; it acks the entry)."""
        ...

    async def owned_elsewhere(self, stream: str) -> bool:
        """True when another daemon holds the stream's lease (it answers forget requests)."""
        ...


class QueryIntake:
    """Feeds validated requests to ``submit`` and cancel ids to ``cancel`` until cancelled.

    ``room`` says how many more durable requests the engine takes now (None: no limit but
    ``read_batch``). ``submit`` may raise :class:`streamer.engine.errors.Busy` (a quick
    request past the queue bound: answered ``busy``; a durable one is retried until its
    deadline) or another QueryError (answered with it). ``connected`` is True while both the
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
        room: Callable[[], int] | None = None,
        replies: ReplyPublisher | None = None,
        clock: Callable[[], float] = time.time,
        stream_key: str | None = None,
        channels: bool = True,
        router: Router | None = None,
    ) -> None:
        """``stream_key``: the stream read (default: the shared request stream; a daemon's
        fleet inbox for its second intake); ``channels``: also serve the pub/sub channels;
        ``router``: requests naming streams other daemons own go to it (sinks.fleet.router)."""
        self._redis_settings = redis
        self._query = query
        self._keys = Keys(redis.prefix)
        self._stream_key = stream_key or self._keys.requests
        self._channels = channels
        self._router = router
        self._submit = submit
        self._cancel = cancel
        self._forget = forget
        self._room = room
        self._replies = replies
        self._clock = clock
        # Stream entries handed to the engine: entry id -> monotonic time after which we stop
        # refreshing its claim (deadline passed; let it be redelivered if never acked).
        self._in_flight: dict[str, float] = {}
        self._stream_up = False
        self._pubsub_up = False
        # The request stream as last seen (None until first read): see QueryStats in schema.
        self.stream_waiting: int | None = None
        self.stream_pending: int | None = None
        self.dead_letters: int | None = None
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
                "dead_lettered",
                "failed_entries",  # unexpected errors on one entry or message (answered internal)
                "bad_messages",  # undecodable cancel/forget/ask messages without an address
                "routed",  # requests handed to the fleet router (streams other daemons own)
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
            decode_responses=False,  # input from anyone: decoded per field, here
        )
        replies = self._replies or ReplyPublisher(self._redis_settings, self._query)
        log.info(
            "query intake on %s as %s/%s (stream %s, channels %s, %s)",
            redact_url(self._redis_settings.url),
            self._query.consumer_group,
            self._query.consumer_name,
            self._stream_key,
            self._keys.ask,
            self._keys.cancel,
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._stream_loop(client, replies), name="intake-stream")
                if self._channels:
                    tasks.create_task(self._pubsub_loop(client, replies), name="intake-pubsub")
                else:
                    self._pubsub_up = True
                tasks.create_task(self._claim_loop(client, replies), name="intake-claim")
                tasks.create_task(self._queue_stats_loop(client), name="intake-stats")
        finally:
            self._stream_up = self._pubsub_up = False
            if self._replies is None:
                await replies.aclose()
            await client.aclose()

    # ------------------------------------------------------------------ durable path

    async def _stream_loop(self, client: RedisClient, replies: ReplyPublisher) -> None:
        backoff = redis_backoff(self._redis_settings)
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
                    count = await self._wait_for_room()
                    response = await client.xreadgroup(
                        self._query.consumer_group,
                        self._query.consumer_name,
                        {self._stream_key: ">"},
                        count=count,
                        block=BLOCK_MS,
                    )
                    raise_if_cancelled()
                    for entry_id, fields in _entries(response):
                        await self._handle_entry(client, replies, entry_id, fields, deliveries=1)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:
                self._stream_up = False
                await self._pause("request stream", exc, backoff)
            except Exception:  # a bug must not end the intake; it is logged with its trace
                self._stream_up = False
                log.exception("request stream loop failed; restarting it")
                await asyncio.sleep(backoff.next_delay())

    async def _wait_for_room(self) -> int:
        """How many entries to read next: at least 1, at most ``read_batch`` and the room."""
        while True:
            room = self._query.read_batch if self._room is None else self._room()
            if room > 0:
                return min(room, self._query.read_batch)
            await asyncio.sleep(ROOM_POLL_S)

    async def _ensure_group(self, client: RedisClient) -> None:
        try:
            # id 0: a stream that already holds requests (XADDed before any daemon ran) is
            # served from its first entry; answered ones are skipped by deduplication.
            await client.xgroup_create(
                self._stream_key, self._query.consumer_group, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _drain_own_pending(self, client: RedisClient, replies: ReplyPublisher) -> None:
        """Serve entries delivered to this consumer name earlier and never acked."""
        last_id = "0"
        while True:
            count = await self._wait_for_room()
            response = await client.xreadgroup(
                self._query.consumer_group,
                self._query.consumer_name,
                {self._stream_key: last_id},
                count=count,
            )
            entries = _entries(response)
            if not entries:
                return
            deliveries = await self._delivery_counts(client, entries)
            for entry_id, fields in entries:
                if entry_id not in self._in_flight:
                    log.info("serving request entry %s left pending by this consumer", entry_id)
                await self._handle_entry(
                    client, replies, entry_id, fields, deliveries=deliveries.get(entry_id, 1)
                )
            last_id = entries[-1][0]

    async def _delivery_counts(
        self, client: RedisClient, entries: list[tuple[str, Fields | None]]
    ) -> dict[str, int]:
        """Times each entry (now ours) was delivered, from XPENDING."""
        ids = [entry_id for entry_id, _ in entries]
        rows = await client.xpending_range(
            self._stream_key,
            self._query.consumer_group,
            min=min(ids, key=_id_key),
            max=max(ids, key=_id_key),
            count=len(ids) + len(self._in_flight),
            consumername=self._query.consumer_name,
        )
        return {_text(row["message_id"]): int(row["times_delivered"]) for row in rows or ()}

    async def _claim_loop(self, client: RedisClient, replies: ReplyPublisher) -> None:
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
                    await self._trim_answered(client)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:
                # The stream loop reports outages and recreates the group; just try again.
                log.debug("claim sweep skipped: %s", exc)
            except Exception:
                log.exception("claim sweep failed")

    async def _refresh_in_flight(self, client: RedisClient) -> None:
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
            self._stream_key,
            self._query.consumer_group,
            self._query.consumer_name,
            min_idle_time=0,
            message_ids=entry_ids,
            justid=True,
        )
        still_pending = {_text(entry_id) for entry_id in claimed or ()}
        for entry_id in entry_ids:
            if entry_id not in still_pending:
                self._in_flight.pop(entry_id, None)

    async def _autoclaim(self, client: RedisClient, replies: ReplyPublisher) -> None:
        """Take over entries idle longer than ``claim_idle_s`` (their consumer died)."""
        start = "0-0"
        for _ in range(AUTOCLAIM_PAGES):
            room = self._query.read_batch if self._room is None else self._room()
            if room <= 0:
                return  # claim them when there is room; they stay pending meanwhile
            result = await client.xautoclaim(
                self._stream_key,
                self._query.consumer_group,
                self._query.consumer_name,
                min_idle_time=int(self._query.claim_idle_s * 1000),
                start_id=start,
                count=min(room, self._query.read_batch),
            )
            next_start = _text(result[0])
            entries = [(_text(entry_id), fields) for entry_id, fields in result[1]]
            entries = [(entry_id, f) for entry_id, f in entries if entry_id not in self._in_flight]
            deliveries = await self._delivery_counts(client, entries) if entries else {}
            for entry_id, fields in entries:
                self.counters["claimed"] += 1
                log.info("claimed request entry %s left idle by another consumer", entry_id)
                await self._handle_entry(
                    client, replies, entry_id, fields, deliveries=deliveries.get(entry_id, 1)
                )
            if next_start == "0-0":
                return
            start = next_start

    async def _remove_dead_consumers(self, client: RedisClient) -> None:
        """Delete consumers with nothing pending and silent for long (old hostname-pid names)."""
        consumers = await client.xinfo_consumers(self._stream_key, self._query.consumer_group)
        for consumer in consumers:
            name = _text(consumer.get("name", b""))
            if (
                name != self._query.consumer_name
                and consumer.get("pending") == 0
                and consumer.get("idle", 0) > DEAD_CONSUMER_IDLE_S * 1000
            ):
                await client.xgroup_delconsumer(self._stream_key, self._query.consumer_group, name)

    async def _trim_answered(self, client: RedisClient) -> None:
        """Past ``stream_maxlen`` (clients that XADD without MAXLEN), drop answered entries.

        Never an entry still waiting to be read or answered: the stream is the queue.
        """
        key = self._stream_key
        if await client.xlen(key) <= self._query.stream_maxlen:
            return
        group = self._group_info(await client.xinfo_groups(key))
        if group is None:
            return
        keep_from = _text(group.get("last-delivered-id", b"0-0"))
        summary = await client.xpending(key, self._query.consumer_group)
        if summary and summary.get("pending") and summary.get("min"):
            keep_from = min(keep_from, _text(summary["min"]), key=_id_key)
        await client.xtrim(key, minid=keep_from, approximate=True)

    def _group_info(self, groups: Any) -> Mapping[str, Any] | None:
        for group in groups or ():
            if _text(group.get("name", b"")) == self._query.consumer_group:
                return group
        return None

    async def _queue_stats_loop(self, client: RedisClient) -> None:
        """Keep ``stream_waiting``, ``stream_pending`` and ``dead_letters`` fresh for status."""
        while True:
            try:
                group = self._group_info(await client.xinfo_groups(self._stream_key))
                if group is not None:
                    lag = group.get("lag")
                    self.stream_waiting = int(lag) if isinstance(lag, int) else None
                    self.stream_pending = int(group.get("pending", 0))
                self.dead_letters = int(await client.xlen(self._keys.requests_dead))
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:  # no stream or group yet, or Redis away
                log.debug("request stream counts not refreshed: %s", exc)
            await asyncio.sleep(QUEUE_STATS_INTERVAL_S)

    async def _handle_entry(
        self,
        client: RedisClient,
        replies: ReplyPublisher,
        entry_id: str,
        fields: Fields | None,
        *,
        deliveries: int,
    ) -> None:
        """Serve one entry; whatever it holds, it ends answered and acked (or in flight)."""
        if entry_id in self._in_flight:
            return  # ours, still running (seen again through a pending re-read)
        if not fields:
            # Trimmed by MAXLEN or deleted while pending: nothing left to serve.
            await client.xack(self._stream_key, self._query.consumer_group, entry_id)
            return
        raw = fields.get(REQUEST_FIELD, b"")  # no `request` field: answered as invalid
        if deliveries > self._query.max_deliveries:
            await self._dead_letter(client, replies, entry_id, fields, deliveries)
            return
        try:
            if not all(_is_utf8(name) for name in fields):
                await self._reject_invalid(
                    replies, raw, None, entry_id, InvalidRequest("entry field names must be UTF-8")
                )
                return
            await self._process(client, replies, raw, entry_id)
        except asyncio.CancelledError:
            raise
        except REDIS_DOWN_ERRORS:
            raise  # the entry stays pending; redelivered (and counted) after the reconnect
        except Exception as exc:  # a bug on one entry: answer it, never re-read it forever
            log.exception("request entry %s failed", entry_id)
            await self._fail_entry(replies, raw, entry_id, exc)

    async def _dead_letter(
        self,
        client: RedisClient,
        replies: ReplyPublisher,
        entry_id: str,
        fields: Fields,
        deliveries: int,
    ) -> None:
        """Copy the entry to ``<prefix>:requests:dead`` with the reason; answer it and ack."""
        reason = (
            f"delivered {deliveries} times without an answer (max_deliveries "
            f"{self._query.max_deliveries}); moved to {self._keys.requests_dead}"
        )
        raw = fields.get(REQUEST_FIELD, b"")
        request_id = salvage_request_id(raw)
        dead: dict[Any, Any] = {
            b"entry": entry_id,
            b"reason": reason,
            b"consumer": self._query.consumer_name,
            b"at": f"{self._clock():.3f}",
        }
        dead.update({b"field:" + name: value for name, value in fields.items()})
        await client.xadd(
            self._keys.requests_dead, dead, maxlen=self._query.dead_letter_maxlen, approximate=True
        )
        self.counters["dead_lettered"] += 1
        log.warning("request entry %s (id %s): %s", entry_id, request_id, reason)
        if request_id is not None and await is_answered(client, self._keys, request_id):
            await client.xack(self._stream_key, self._query.consumer_group, entry_id)
            return  # answered before (only the ack was lost): keep that answer
        await self._reject(replies, request_id or entry_id, entry_id, QueryError(reason))

    async def _fail_entry(
        self, replies: ReplyPublisher, raw: bytes | str, entry_id: str | None, exc: Exception
    ) -> None:
        """Answer ``internal`` to a request whose handling raised unexpectedly (logged)."""
        self.counters["failed_entries"] += 1
        reply_id = salvage_request_id(raw) or entry_id
        if reply_id is not None:
            await self._reject(replies, reply_id, entry_id, "internal", f"internal error: {exc!r}")

    # ------------------------------------------------------------------ quick path

    async def _pubsub_loop(self, client: RedisClient, replies: ReplyPublisher) -> None:
        backoff = redis_backoff(self._redis_settings)
        ask, cancel, forget = (
            key.encode() for key in (self._keys.ask, self._keys.cancel, self._keys.forget)
        )
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = await open_pubsub(client, ignore_subscribe_messages=True)
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
                    raise_if_cancelled()
                    if message is None:
                        continue
                    channel, data = message.get("channel"), message.get("data")
                    if not isinstance(data, bytes):
                        continue
                    try:
                        if channel == cancel:
                            self._on_cancel(data)
                        elif channel == forget:
                            await self._on_forget(replies, data)
                        elif channel == ask:
                            await self._process_quick(client, replies, data)
                    except REDIS_DOWN_ERRORS:
                        raise
                    except Exception as exc:  # one bad message must not drop the subscription
                        log.exception("a message on %s failed", _text(channel or b"?"))
                        await self._fail_entry(replies, data, None, exc)
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
                if pubsub is not None:
                    with contextlib.suppress(*REDIS_DOWN_ERRORS):
                        await pubsub.aclose()

    async def _process_quick(
        self, client: RedisClient, replies: ReplyPublisher, data: bytes
    ) -> None:
        """A quick request, tried twice: after a Redis restart the first command may meet a
        pooled connection the server closed, and a pub/sub message is not delivered again."""
        try:
            await self._process(client, replies, data, None)
        except REDIS_DOWN_ERRORS as exc:
            log.debug("quick request retried after %s", one_line(exc))
            await self._process(client, replies, data, None)

    def _on_cancel(self, data: bytes) -> None:
        request_id = data.decode("utf-8", "replace").strip()
        if not is_request_id(request_id):
            self.counters["bad_messages"] += 1
            log.warning("ignoring a cancel message that is not a request id")
            return
        self.counters["cancels"] += 1
        try:
            self._cancel(request_id)
        except Exception:
            log.exception("cancel callback failed for %s", request_id)

    async def _on_forget(self, replies: ReplyPublisher, data: bytes) -> None:
        """Run one forget request and confirm it (or say why not) on its reply channel."""
        assert self._forget is not None
        try:
            request_id = request_id_of(decode_request(data))
        except QueryError:
            request_id = salvage_request_id(data)
        try:
            request = parse_forget(data, self._clock())
            if self._router is not None and await self._router.owned_elsewhere(request.stream):
                # Every daemon hears the forget channel: the stream's owner answers it.
                log.debug("forget request %s is for %s's owner", request.id, request.stream)
                return
            await self._forget(request)
        except QueryError as exc:
            if request_id is not None:
                await self._reject(replies, request_id, None, exc)
            else:
                self.counters["bad_messages"] += 1
            log.warning("forget request refused: %s", one_line(exc))
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
        client: RedisClient,
        replies: ReplyPublisher,
        raw: bytes | str,
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
            await self._reject_invalid(replies, raw, payload, entry_id, exc)
            return

        if entry_id is not None and waited_too_long(entry_id, request, received_at):
            self.counters["expired"] += 1
            await self._reject(
                replies,
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
                await self._reject(
                    replies,
                    request.id,
                    entry_id,
                    InvalidRequest("request id already used and its answer expired; use a new id"),
                )
            elif entry_id is not None:
                await client.xack(self._stream_key, self._query.consumer_group, entry_id)
            return

        ticket = ticket_of(
            request,
            entry_id,
            received_at,
            sent_at=None if entry_id is None else entry_added_at(entry_id),
            ack_stream=None if entry_id is None else self._stream_key,
        )
        if entry_id is not None:
            self._in_flight[entry_id] = (
                time.monotonic() + request.deadline_s + self._query.claim_idle_s
            )
        if self._router is not None and await self._router.takes(request):
            # Streams of other daemons: coordinated apart, this loop reads on meanwhile.
            await self._router.coordinate(request, entry_id, received_at)
            self.counters["routed"] += 1
            return
        try:
            await self._submit_when_room(ticket)
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

    async def _submit_when_room(self, ticket: QueryTicket) -> None:
        """Submit; a durable request the engine calls busy waits for room (never ``busy``)."""
        while True:
            try:
                await self._submit(ticket)
                return
            except Busy:
                if ticket.entry_id is None:
                    raise
                if self._clock() > ticket.deadline_at:
                    raise QueryTimeout(
                        f"no room in the engine within the deadline of "
                        f"{ticket.request.deadline_s:g} s"
                    ) from None
            await asyncio.sleep(ROOM_POLL_S)

    async def _reject_invalid(
        self,
        replies: ReplyPublisher,
        raw: bytes | str,
        payload: Any,
        entry_id: str | None,
        exc: InvalidRequest,
    ) -> None:
        self.counters["invalid"] += 1
        reply_id = request_id_of(payload) or salvage_request_id(raw) or entry_id
        if reply_id is None:
            self.counters["bad_messages"] += 1
            log.warning("dropping an invalid request without an id (ask channel): %s", exc)
            return
        log.info("invalid request %s: %s", reply_id, one_line(exc))
        await self._reject(replies, reply_id, entry_id, exc)

    async def _reject(
        self,
        replies: ReplyPublisher,
        request_id: str,
        entry_id: str | None,
        error: QueryError | str,
        message: str | None = None,
    ) -> bool:
        """An error event on one request, acking its entry in the stream this intake reads."""
        return await replies.reject(
            request_id, entry_id, error, message, ack_stream=self._stream_key
        )

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
            one_line(exc),
            delay,
        )
        await asyncio.sleep(delay)


def _entries(response: Any) -> list[tuple[str, Fields | None]]:
    """(entry id, raw fields) pairs of an XREADGROUP reply, RESP2 (list) or RESP3 (dict)."""
    if not response:
        return []
    streams = response.items() if isinstance(response, dict) else response
    entries: list[tuple[str, Fields | None]] = []
    for _name, stream_entries in streams:
        for entry in stream_entries or ():
            entries.append((_text(entry[0]), entry[1]))
    return entries


def _text(value: Any) -> str:
    """An id or name from a Redis reply (bytes from the raw client), as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream entry id ``<ms>-<seq>``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
