"""Routing a request to the owners of its streams, and merging their parts into one final.

Whichever daemon reads a request from the shared request stream coordinates it. A request
naming only streams this daemon owns never comes here (the intake serves it as a lone daemon
would). Otherwise::

    leases ──▶ group the streams by owner ──▶ one sub-request per owner ──▶ inbox:<owner>
    answer:<sub id> (polled) ──▶ parts ──▶ merge (sinks.fleet.merge) ──▶ SET NX answer:<id>

- ``*`` is every stream a live daemon serves (``records.fleet_streams``). A stream "known" to
  the fleet is one a presence record names, live or gone (a killed daemon's record stays).
- A sub-request is an ordinary request whose id names the parent, the owner and a tag of the
  owner's fences for those streams. Owners answer it like any request (their inbox intake,
  deduplicated by id) and store it at ``answer:<sub id>``. A coordinator started again on the
  same parent (its entry claimed after a crash) sends the same ids, so it finds answers already
  given instead of asking twice.
- While waiting, the leases are read again: a part whose owner or fence changed meanwhile is
  ignored and its streams are asked of the new owner under a new id. A stream with no lease is
  waited for up to ``fleet.owner_wait_s`` (an adoption in progress), then answered as a
  ``no_owner`` gap; a stream no daemon knows at all makes the request ``unknown_stream``.
- The final is stored with SET NX before it is published (``ReplyPublisher.deliver_once``):
  two coordinators of one request never both deliver. The parent entry stays pending (its
  claim refreshed by the intake) until then, so a coordinator killed midway leaves it to be
  claimed and coordinated again.
- The inbox of a daemon whose presence expired is removed by the live ones: the sub-requests
  it held carry a dead owner's fence, so their coordinators re-send them to the new owners.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from pydantic import ValidationError
from redis.asyncio.client import PubSub

from sinks.connection import (
    REDIS_DOWN_ERRORS,
    RedisClient,
    open_pubsub,
    open_redis,
    raise_if_cancelled,
)
from sinks.dedupe import entry_added_at
from sinks.fleet.merge import Part, merge_parts
from sinks.fleet.records import LeaseRecord, fleet_streams, read_daemons, read_leases
from sinks.fleet.settings import FleetSettings
from sinks.replies import ReplyPublisher
from sinks.schema import (
    SCHEMA_VERSION,
    Answer,
    QueryRequest,
    error_event,
    final_event,
    json_object,
    one_line,
)
from sinks.settings import Keys, QuerySettings, RedisSettings
from streamer.engine.errors import QueryCancelled, QueryError, QueryTimeout, UnknownStream

log = logging.getLogger(__name__)

POLL_S = 0.02  # how often outstanding parts are looked for (pipelined GETs per request)
LEASE_CHECK_S = 0.5  # how often the leases of outstanding parts are read again
MAX_COORDINATING = 64  # requests coordinated at once; the intake waits beyond it
SWEEP_EVERY_S = 5.0  # removal of dead daemons' inboxes
MAX_ID_CHARS = 128  # the bound of sinks.schema.REQUEST_ID_PATTERN
REQUEST_FIELD = "request"  # the one field of a request-stream entry (sinks.intake)


@dataclass(frozen=True, slots=True)
class SubRequest:
    """The part of one request asked of one owner, under the fences it held then."""

    id: str
    owner: str
    streams: tuple[str, ...]
    fences: tuple[int, ...]

    def still_owned(self, leases: Mapping[str, LeaseRecord]) -> bool:
        return all(
            (lease := leases.get(name)) is not None
            and lease.daemon_id == self.owner
            and lease.fence == fence
            for name, fence in zip(self.streams, self.fences, strict=True)
        )


def sub_request_id(parent_id: str, owner: str, fences: Mapping[str, int]) -> str:
    """``<parent>:<owner>:f<tag>``: the tag changes when any of the owner's fences changes."""
    pairs = ",".join(f"{name}={fence}" for name, fence in sorted(fences.items()))
    tag = hashlib.sha1(pairs.encode(), usedforsecurity=False).hexdigest()[:12]
    candidate = f"{parent_id}:{owner}:f{tag}"
    if len(candidate) <= MAX_ID_CHARS:
        return candidate
    parent = hashlib.sha1(parent_id.encode(), usedforsecurity=False).hexdigest()[:24]
    return f"{parent}:{owner}:f{tag}"


def plan_parts(
    parent_id: str, streams: Collection[str], leases: Mapping[str, LeaseRecord]
) -> list[SubRequest]:
    """One sub-request per owner of the leased ``streams`` (pure); unleased ones are left out."""
    by_owner: dict[str, dict[str, int]] = {}
    for name in streams:
        lease = leases.get(name)
        if lease is not None:
            by_owner.setdefault(lease.daemon_id, {})[name] = lease.fence
    return [
        SubRequest(
            sub_request_id(parent_id, owner, fences),
            owner,
            tuple(fences),
            tuple(fences.values()),
        )
        for owner, fences in by_owner.items()
    ]


class FleetRouter:
    """Coordinates requests that name streams of other daemons (see the module docstring).

    ``local`` says which streams this daemon serves now. ``run`` sweeps dead inboxes until
    cancelled and, when it ends, cancels the requests still being coordinated (their entries
    stay pending and are coordinated again by whoever claims them).
    """

    def __init__(
        self,
        redis: RedisSettings,
        query: QuerySettings,
        fleet: FleetSettings,
        *,
        replies: ReplyPublisher,
        local: Callable[[], Collection[str]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis_settings = redis
        self._query = query
        self._fleet = fleet
        self._keys = Keys(redis.prefix)
        self._replies = replies
        self._local = local
        self._clock = clock
        self._client = open_redis(redis, read_timeout_s=redis.connect_timeout_s + 5.0)
        self._slots = asyncio.Semaphore(MAX_COORDINATING)
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancelled: dict[str, asyncio.Event] = {}  # request id -> set when cancelled
        self.counters: dict[str, int] = dict.fromkeys(
            ("coordinated", "delivered", "duplicates", "resent", "no_owner", "swept"), 0
        )

    @property
    def coordinating(self) -> int:
        return len(self._tasks)

    async def takes(self, request: QueryRequest) -> bool:
        """True when ``request`` names a stream some other daemon serves (or ``*`` does)."""
        local = set(self._local())
        if request.all_streams:
            return bool(set(await fleet_streams(self._client, self._keys)) - local)
        foreign = [name for name in request.stream if name not in local]
        if not foreign:
            return False
        # A stream nobody knows is answered unknown_stream on the lone-daemon path.
        leases = await read_leases(self._client, self._keys, foreign)
        known = set(leases) | await self._known_streams()
        return any(name in known for name in foreign)

    async def owned_elsewhere(self, stream: str) -> bool:
        """True when another daemon holds ``stream``'s lease (it answers for the stream)."""
        if stream in set(self._local()):
            return False
        lease = (await read_leases(self._client, self._keys, [stream])).get(stream)
        return lease is not None and lease.daemon_id != self._fleet.daemon_id

    async def _known_streams(self) -> set[str]:
        """Streams any daemon, live or gone, may serve or owned; and ours.

        A daemon that was killed keeps its presence record (only a clean stop removes it), so
        its streams are answered ``no_owner`` until adopted, never ``unknown_stream``.
        """
        names = set(self._local())
        for record in (await read_daemons(self._client, self._keys, include_gone=True)).values():
            names.update(record.serves)
            names.update(record.owns)
        return names

    def cancel(self, request_id: str) -> bool:
        """Cancel a request coordinated here (its parts too); False when it is not ours."""
        event = self._cancelled.get(request_id)
        if event is None:
            return False
        event.set()
        return True

    async def coordinate(
        self, request: QueryRequest, entry_id: str | None, received_at: float
    ) -> None:
        """Start coordinating; waits only while MAX_COORDINATING requests already run."""
        await self._slots.acquire()
        task = asyncio.create_task(
            self._serve(request, entry_id, received_at), name=f"route-{request.id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.sweep_dead_inboxes()
                except REDIS_DOWN_ERRORS as exc:
                    log.debug("inbox sweep skipped: %s", exc)
                await asyncio.sleep(SWEEP_EVERY_S)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks))

    async def aclose(self) -> None:
        await self._client.aclose()

    # ---- one request ------------------------------------------------------------------------

    async def _serve(self, request: QueryRequest, entry_id: str | None, received_at: float) -> None:
        self.counters["coordinated"] += 1
        self._cancelled[request.id] = asyncio.Event()
        sent_at = entry_added_at(entry_id) if entry_id is not None else None
        started_at = min(received_at, sent_at) if sent_at is not None else received_at
        give_up_at = time.monotonic() + max(0.0, started_at + request.deadline_s - self._clock())
        try:
            try:
                answer = await self._gather(request, received_at, give_up_at)
                payload = final_event(answer)
            except QueryError as exc:
                payload = error_event(request.id, exc.code, str(exc) or exc.code)
            if await self._replies.deliver_once(request.id, entry_id, payload):
                self.counters["delivered"] += 1
            else:
                self.counters["duplicates"] += 1
                log.info("request %s was already answered by another coordinator", request.id)
        except asyncio.CancelledError:
            raise
        except REDIS_DOWN_ERRORS as exc:
            # The entry stays pending: claimed and coordinated again once Redis is back.
            log.warning("coordinating request %s stopped: %s", request.id, one_line(exc))
        except Exception:  # a bug on one request must not end the intake; the entry stays
            log.exception("coordinating request %s failed", request.id)
        finally:
            self._cancelled.pop(request.id, None)

    async def _gather(self, request: QueryRequest, received_at: float, give_up_at: float) -> Answer:
        streams = await self._streams_of(request)
        parts: dict[str, Part] = {}  # by sub id, or by stream for a part without an owner
        open_streams = list(streams)  # not yet in a part
        outstanding: dict[str, SubRequest] = {}
        cancelled = self._cancelled[request.id]
        relay = _TokenRelay(self._client, self._keys, self._replies, request.id)
        try:
            await self._gather_loop(
                request, streams, give_up_at, cancelled, relay,
                parts=parts, open_streams=open_streams, outstanding=outstanding,
            )  # fmt: skip
        finally:
            await relay.aclose()
        for sub in outstanding.values():
            parts[sub.id] = Part(sub.streams, sub.owner, error="timeout", message="no answer")
        for name in open_streams:
            parts[name] = Part.unowned([name], self._fleet.owner_wait_s)
        if parts and all(p.answer is None and p.daemon is not None for p in parts.values()):
            # Only owners' errors (no memory yet, timeout, ...): the client gets the error
            # event a lone daemon would have sent, not an empty answer.
            raise _relayed(next(iter(parts.values())))
        return merge_parts(
            request.id,
            request.question,
            streams,
            list(parts.values()),
            coordinator=self._fleet.daemon_id,
            window=(request.since, request.until),
            latency_s=max(0.0, self._clock() - received_at),
            now=self._clock(),
        )

    async def _gather_loop(
        self,
        request: QueryRequest,
        streams: list[str],
        give_up_at: float,
        cancelled: asyncio.Event,
        relay: _TokenRelay,
        *,
        parts: dict[str, Part],
        open_streams: list[str],
        outstanding: dict[str, SubRequest],
    ) -> None:
        """Send, re-send and collect parts until every stream has one or time is up."""
        unowned_since: dict[str, float] = {}
        leases: Mapping[str, LeaseRecord] = {}
        next_lease_check = 0.0
        while open_streams or outstanding:
            if cancelled.is_set():
                for sub_id in outstanding:  # owners cancel their parts (pub/sub: best effort)
                    await self._client.publish(self._keys.cancel, sub_id)
                raise QueryCancelled("cancelled by the client")
            now = time.monotonic()
            if now >= give_up_at:
                break
            if now >= next_lease_check:
                leases = await read_leases(self._client, self._keys, streams)
                next_lease_check = now + LEASE_CHECK_S
                for sub in [s for s in outstanding.values() if not s.still_owned(leases)]:
                    del outstanding[sub.id]
                    open_streams.extend(sub.streams)
                    self.counters["resent"] += 1
                    log.info("part %s of %s: its owner changed; asking again", sub.id, request.id)
                await self._send(request, give_up_at, open_streams, leases, outstanding, relay)
                for name in [n for n in open_streams if n not in leases]:
                    first = unowned_since.setdefault(name, now)
                    if now - first >= self._fleet.owner_wait_s:
                        open_streams.remove(name)
                        parts[name] = Part.unowned([name], self._fleet.owner_wait_s)
                        self.counters["no_owner"] += 1
            await self._collect(outstanding, parts, leases)
            if open_streams or outstanding:
                # Tokens are passed on while one owner answers the whole request alone.
                await relay.wait(POLL_S, relaying=len(outstanding) == 1 and not parts)

    async def _streams_of(self, request: QueryRequest) -> list[str]:
        """The request's streams (``*``: every fleet stream); raises UnknownStream."""
        if request.all_streams:
            live = set(await fleet_streams(self._client, self._keys))
            return sorted(live | set(self._local()))
        known = await self._known_streams()
        names = list(request.stream)
        leases = await read_leases(self._client, self._keys, names)
        unknown = [name for name in names if name not in known and name not in leases]
        if unknown:
            shown = ", ".join(sorted(known)) or "none"
            raise UnknownStream(f"unknown stream(s): {', '.join(unknown)}; known: {shown}")
        return names

    async def _send(
        self,
        request: QueryRequest,
        give_up_at: float,
        open_streams: list[str],
        leases: Mapping[str, LeaseRecord],
        outstanding: dict[str, SubRequest],
        relay: _TokenRelay,
    ) -> None:
        """XADD one sub-request per owner of the open streams that have one (its reply channel
        followed first, so no token is published before we listen)."""
        remaining_s = max(0.1, give_up_at - time.monotonic())
        for sub in plan_parts(request.id, open_streams, leases):
            payload = {
                "v": SCHEMA_VERSION,
                "id": sub.id,
                "stream": list(sub.streams),
                "question": request.question,
                "since": request.since,
                "until": request.until,
                "max_new_tokens": request.max_new_tokens,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "deadline_s": round(min(3600.0, remaining_s), 3),
            }
            await relay.follow([sub.id])
            await self._client.xadd(
                self._keys.inbox(sub.owner),
                {REQUEST_FIELD: json.dumps(payload, ensure_ascii=False)},
                maxlen=self._query.stream_maxlen,
                approximate=True,
            )
            outstanding[sub.id] = sub
            for name in sub.streams:
                open_streams.remove(name)

    async def _collect(
        self,
        outstanding: dict[str, SubRequest],
        parts: dict[str, Part],
        leases: Mapping[str, LeaseRecord],
    ) -> None:
        """Move the parts whose answers are stored into ``parts``."""
        if not outstanding:
            return
        ids = list(outstanding)
        pipe = self._client.pipeline(transaction=False)  # one GET per slot on a Cluster
        for sub_id in ids:
            pipe.get(self._keys.answer(sub_id))
        stored = await pipe.execute()
        for sub_id, raw in zip(ids, stored, strict=True):
            if raw is None:
                continue
            sub = outstanding[sub_id]
            if not sub.still_owned(leases):
                continue  # from an owner that lost the stream: asked again at the lease check
            del outstanding[sub_id]
            parts[sub_id] = _part_of(sub, raw)

    # ---- dead daemons -----------------------------------------------------------------------

    async def sweep_dead_inboxes(self) -> int:
        """Remove the inboxes of daemons whose presence expired; returns how many went.

        What they held was asked under a dead owner's fence: each coordinator asks the new
        owner itself (and a coordinator that died too has its entry claimed and re-run).
        """
        swept = 0
        daemons = await read_daemons(self._client, self._keys, include_gone=True)
        now = self._clock()
        for record in daemons.values():
            if record.daemon_id == self._fleet.daemon_id or record.alive(now):
                continue
            inbox = self._keys.inbox(record.daemon_id)
            waiting = await self._client.xlen(inbox)
            if await self._client.delete(inbox):
                swept += 1
                log.info(
                    "removed the inbox of daemon %s (gone since %.0f s; %d entries)",
                    record.daemon_id, now - record.expires_at, waiting,
                )  # fmt: skip
        self.counters["swept"] += swept
        return swept


class _TokenRelay:
    """Passes the token events of a request's parts on to its own reply channel.

    Best effort, like every token event: the final answer is what counts. Waiting here also
    wakes the coordinator as soon as a part's final is published, instead of a full poll.
    """

    def __init__(
        self, client: RedisClient, keys: Keys, replies: ReplyPublisher, request_id: str
    ) -> None:
        self._client = client
        self._pubsub: PubSub | None = None  # opened with the first channel followed
        self._keys = keys
        self._replies = replies
        self._request_id = request_id
        self._channels: set[str] = set()

    async def follow(self, sub_ids: Collection[str]) -> None:
        new = [self._keys.reply(s) for s in sub_ids if self._keys.reply(s) not in self._channels]
        if new:
            if self._pubsub is None:
                self._pubsub = await open_pubsub(self._client, ignore_subscribe_messages=True)
            await self._pubsub.subscribe(*new)
            self._channels.update(new)

    async def wait(self, timeout_s: float, *, relaying: bool) -> None:
        if self._pubsub is None or not self._channels:
            await asyncio.sleep(timeout_s)
            return
        message = await self._pubsub.get_message(timeout=timeout_s)
        raise_if_cancelled()
        while message is not None:
            event = json_object(message.get("data"))
            if relaying and event is not None and event.get("type") == "token":
                index, text = event.get("index"), event.get("text")
                if isinstance(index, int) and isinstance(text, str):
                    await self._replies.token(self._request_id, index, text)
            message = await self._pubsub.get_message(timeout=0.0)

    async def aclose(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self._pubsub.aclose()


def _relayed(part: Part) -> QueryError:
    """An owner's error as this request's error, with the owner's code."""
    if part.error == "timeout":
        return QueryTimeout(f"no answer from {part.daemon} within the deadline")
    error = QueryError(f"{part.daemon}: {part.message or part.error}")
    error.code = part.error or "internal"
    return error


def _part_of(sub: SubRequest, raw: str | bytes) -> Part:
    """An owner's stored event as a part: its answer, or the error it gave."""
    try:
        event = json.loads(raw)
    except ValueError:
        return Part(sub.streams, sub.owner, error="internal", message="unreadable answer")
    if not isinstance(event, dict):
        return Part(sub.streams, sub.owner, error="internal", message="unreadable answer")
    if event.get("type") == "error":
        return Part(
            sub.streams,
            sub.owner,
            error=str(event.get("code") or "internal"),
            message=one_line(event.get("message") or ""),
        )
    fields = {name: value for name, value in event.items() if name in Answer.model_fields}
    try:
        answer = Answer.model_validate(fields)
    except ValidationError as exc:
        return Part(sub.streams, sub.owner, error="internal", message=one_line(exc))
    return Part(sub.streams, answer.daemon or sub.owner, answer=answer)


def describe_owners(
    streams: Collection[str], leases: Mapping[str, LeaseRecord], alive: Collection[str]
) -> list[tuple[str, str | None, str | None]]:
    """(stream, owner, warning) rows for ``ask --verbose``: who answers each stream."""
    rows: list[tuple[str, str | None, str | None]] = []
    for name in streams:
        lease = leases.get(name)
        if lease is None:
            rows.append((name, None, "no live owner (the answer names it as a no_owner gap)"))
        elif lease.daemon_id not in alive:
            rows.append((name, lease.daemon_id, "its owner's presence expired"))
        else:
            rows.append((name, lease.daemon_id, None))
    return rows


__all__ = ["FleetRouter", "SubRequest", "describe_owners", "plan_parts", "sub_request_id"]
