"""One running daemon per daemon id, its presence record, and the daemon's view of its Redis.

Each daemon writes a presence record (``sinks.fleet.records.DaemonRecord``: id, host, pid,
start time, the streams it may serve and owns) into the hash ``Keys.daemons`` under its
``fleet.daemon_id``, renewed by a heartbeat every third of ``redis.lock_ttl_s`` with
``expires_at`` = now + that TTL, and removed at a clean stop. Daemons with different ids share a
Redis (a fleet, ``sinks.fleet``); a second daemon with the same id refuses to start, since two
of them would read one id's requests and leases. A SIGKILLed daemon's record expires by its
stamp; a daemon on the same host takes it over at once when the pid it names is gone.

Each beat opens a fresh connection, so the heartbeat is also the daemon's health check of its
Redis: away (retried with backoff), authentication refused (a rotated password shows within a
beat, although open connections stay authenticated), or an ACL permission missing. Each change
of that state is one log line (warning when bad) and is shown in status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sinks.connection import (
    REDIS_DOWN_ERRORS,
    RedisClient,
    RedisState,
    check_access,
    describe_redis_error,
    open_redis,
    redis_state_of,
)
from sinks.errors import BusAccessDenied, DaemonConflict
from sinks.fleet.records import DaemonRecord
from sinks.fleet.settings import FleetSettings
from sinks.redact import redact_url
from sinks.settings import Keys, QuerySettings, RedisSettings
from sinks.timefmt import iso_time
from streamer.ingest.backoff import Backoff

log = logging.getLogger(__name__)

BACKOFF_JITTER = 0.2

# Write our record when the id's field is free, expired (by its stamp, ARGV[4] = now) or ours
# (the token in its ``extra``); otherwise return the record of who holds the id.
_TAKE_OR_RENEW = """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder then
  local ok, record = pcall(cjson.decode, holder)
  if ok and type(record) == 'table' then
    local extra = record['extra']
    local mine = type(extra) == 'table' and extra['token'] == ARGV[3]
    local expires = tonumber(record['expires_at'])
    if not mine and expires ~= nil and expires > tonumber(ARGV[4]) then return holder end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
_REPLACE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if not holder then return 0 end
local ok, record = pcall(cjson.decode, holder)
if ok and type(record) == 'table' and type(record['extra']) == 'table'
    and record['extra']['token'] == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True)
class RedisHealth:
    """An immutable view of the daemon's Redis for status."""

    state: RedisState
    url: str  # redacted
    last_error: str | None
    since: float  # epoch seconds of the last change of state


class DaemonLock:
    """This daemon's presence (its daemon id held): ``try_acquire()`` once at start, then
    ``run()`` as a task; ``release()`` at a clean stop.

    ``owned`` is set from the first acquisition on (the intake waits for it).
    """

    def __init__(
        self,
        redis: RedisSettings,
        query: QuerySettings,
        fleet: FleetSettings | None = None,
        *,
        streams: Callable[[], tuple[tuple[str, ...], tuple[str, ...]]] = lambda: ((), ()),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``streams()``: what the presence record says this daemon may serve and owns now."""
        self._settings = redis
        self._query = query
        self._fleet = fleet or FleetSettings()
        self._key = Keys(redis.prefix).daemons
        self._field = self._fleet.daemon_id
        self._streams = streams
        self._clock = clock
        self._started_at = clock()
        self._token = uuid.uuid4().hex
        self._checked = False  # access checked on the current run of good beats
        self.owned = asyncio.Event()
        self._health = RedisHealth(RedisState.CONNECTING, redact_url(redis.url), None, clock())

    @property
    def daemon_id(self) -> str:
        return self._field

    def record(self) -> DaemonRecord:
        """This daemon's presence record as of now."""
        serves, owns = self._streams()
        return DaemonRecord(
            daemon_id=self._field,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self._started_at,
            expires_at=self._clock() + self._settings.lock_ttl_s,
            serves=serves,
            owns=owns,
            weight=self._fleet.weight,
            extra={"token": self._token},
        )

    @property
    def health(self) -> RedisHealth:
        return self._health

    @property
    def beat_s(self) -> float:
        return self._settings.lock_ttl_s / 3.0

    async def try_acquire(self) -> bool:
        """One attempt: True when the lock is held now, False when Redis is away.

        Raises DaemonConflict when another daemon holds it, BusAccessDenied when Redis refuses
        us. After the first acquisition a refusal is a state (and a warning), not an error.
        """
        try:
            await self._beat()
        except BusAccessDenied as exc:
            self._set(RedisState.NO_PERMISSION, str(exc))
            if not self.owned.is_set():
                raise
            return False
        except REDIS_DOWN_ERRORS as exc:
            state = redis_state_of(exc)
            message = describe_redis_error(exc, self._settings.url)
            self._set(state, message)
            if state is not RedisState.UNREACHABLE and not self.owned.is_set():
                raise BusAccessDenied(message) from exc
            return False
        self._set(RedisState.CONNECTED, None)
        self.owned.set()
        return True

    async def run(self) -> None:
        """Acquire (retrying with backoff while Redis is away), then renew until cancelled.

        Raises DaemonConflict when another daemon holds or takes over the lock, and
        BusAccessDenied when Redis refuses us before the lock was ever held.
        """
        backoff = Backoff(
            self._settings.backoff_initial_s, self._settings.backoff_max_s, BACKOFF_JITTER
        )
        while True:
            if await self.try_acquire():
                backoff.reset()
                await asyncio.sleep(self.beat_s)
            else:
                await asyncio.sleep(min(backoff.next_delay(), self.beat_s))

    async def release(self) -> None:
        """Delete the lock if it is still ours (best effort: Redis may be away)."""
        if not self.owned.is_set():
            return
        client = self._open()
        try:
            await client.eval(_RELEASE, 1, self._key, self._field, self._token)
        except REDIS_DOWN_ERRORS as exc:
            log.warning("could not remove this daemon's presence (it expires by itself): %s", exc)
        finally:
            await client.aclose()

    async def _beat(self) -> None:
        client = self._open()
        try:
            if not self._checked:
                await check_access(client, self._settings, self._query)
                self._checked = True
            args = (self._field, self.record().to_json(), self._token, repr(self._clock()))
            answer = await client.eval(_TAKE_OR_RENEW, 1, self._key, *args)
        except REDIS_DOWN_ERRORS:
            self._checked = False  # check again once Redis answers: the ACL may have changed
            raise
        finally:
            await client.aclose()
        if answer != 1 and not await self._replace_dead(str(answer)):
            raise DaemonConflict(self._conflict(str(answer)))

    async def _replace_dead(self, holder_json: str) -> bool:
        """Take the lock of a daemon on this host that is gone (SIGKILLed, then restarted by
        systemd at once): no need to wait for its lock to expire."""
        if self.owned.is_set() or not _dead_here(holder_json):
            return False
        client = self._open()
        try:
            args = (self._field, holder_json, self.record().to_json())
            replaced = await client.eval(_REPLACE, 1, self._key, *args)
        finally:
            await client.aclose()
        if replaced == 1:
            log.warning("took over daemon id %r from a daemon that is gone (%s)", self._field,
                        describe_holder(holder_json))  # fmt: skip
        return replaced == 1

    def _conflict(self, holder_json: str) -> str:
        where = (
            f"Redis at {redact_url(self._settings.url)} with prefix {self._settings.prefix!r} "
            f"as daemon id {self._field!r} (give each daemon its own fleet.daemon_id)"
        )
        taken = "has taken over" if self.owned.is_set() else "already serves"
        return f"another flashwatch daemon ({describe_holder(holder_json)}) {taken} {where}"

    def _open(self) -> RedisClient:
        return open_redis(self._settings, read_timeout_s=self._settings.connect_timeout_s + 2.0)

    def _set(self, state: RedisState, error: str | None) -> None:
        if state is self._health.state and error == self._health.last_error:
            return
        if state is RedisState.CONNECTED:
            log.info("Redis at %s: connected", redact_url(self._settings.url))
        elif error is not None:
            retry = "; retrying" if state is RedisState.UNREACHABLE or self.owned.is_set() else ""
            log.warning("%s%s", error, retry)
        self._health = RedisHealth(state, redact_url(self._settings.url), error, self._clock())


def _dead_here(holder_json: str) -> bool:
    """True when the lock names a process on this host that no longer exists."""
    try:
        holder = json.loads(holder_json)
        pid, host = int(holder["pid"]), str(holder["host"])
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def describe_holder(holder_json: str) -> str:
    """``pid 4242 on host-a, since 2026-11-24T14:03:07+01:00`` from a lock value."""
    try:
        holder = json.loads(holder_json)
        return (
            f"pid {int(holder['pid'])} on {str(holder['host'])[:64]}, "
            f"since {iso_time(float(holder['started_at']))}"
        )
    except (ValueError, KeyError, TypeError):
        return "unknown holder"
