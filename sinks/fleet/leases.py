"""Per-stream leases with fencing: at most one daemon owns a stream at any time.

A lease is the expiring key ``Keys.lease(stream)`` holding a ``LeaseRecord``; its fence comes
from ``Keys.fence(stream)``, a counter that only grows. Both keys share the stream's hash tag,
so each script below touches one Cluster slot.

- acquire: when the lease is absent (or names this daemon id: an earlier run of it), INCR the
  fence (raised above ``floor``, the highest fence the stream's snapshot folder records, should
  the counter have been lost) and SET the lease with a PX TTL;
- renew: PEXPIRE only while the lease is still exactly ours (same daemon id and fence);
- release: DEL only while it is ours.

The holder (:class:`Leases`) trusts a lease by its own monotonic clock only: for the TTL since
the start of its last successful renewal, minus a margin. Past that the lease has lapsed: the
caller checks at once whether it is free (take it again) or someone else's (what an owner paused
by SIGSTOP finds on SIGCONT): then the stream is lost and stops at once, without a snapshot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sinks.connection import REDIS_DOWN_ERRORS, RedisClient
from sinks.fleet.records import LeaseRecord
from sinks.settings import Keys

log = logging.getLogger(__name__)

TRUST_MARGIN = 0.2  # fraction of the TTL a holder stops trusting its lease before it expires

# KEYS: lease, fence. ARGV: record head (up to the fence), record tail, ttl ms, fence floor,
# daemon id. A lease naming our own daemon id is an earlier run of this daemon (one process per
# id, sinks.daemon_lock): it is taken at once, with a new fence.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then
  local ok, record = pcall(cjson.decode, holder)
  if not (ok and type(record) == 'table' and record['daemon'] == ARGV[5]) then return false end
end
local fence = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[4])
if fence <= floor then
  fence = floor + 1
  redis.call('SET', KEYS[2], fence)
end
redis.call('SET', KEYS[1], ARGV[1] .. fence .. ARGV[2], 'PX', ARGV[3])
return fence
"""
# KEYS: lease. ARGV: our record, ttl ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_FENCE_SLOT = -7  # stands for the fence in the record template handed to the acquire script


async def acquire(
    client: RedisClient,
    keys: Keys,
    stream: str,
    daemon_id: str,
    *,
    ttl_s: float,
    floor: int = 0,
    now: float | None = None,
) -> LeaseRecord | None:
    """Take the stream's lease if nobody else holds it: the new record, or None when another
    daemon id holds it. A lease of ``daemon_id`` itself (a run of it that was SIGKILLed and
    restarted) is taken over at once.

    The fence is above every earlier one and above ``floor``. Raises Redis errors as they come.
    """
    acquired_at = time.time() if now is None else now
    template = LeaseRecord(stream, daemon_id, _FENCE_SLOT, acquired_at).to_json()
    head, slot, tail = template.partition(f'"fence":{_FENCE_SLOT}')
    assert slot, "the record's JSON names its fence"
    fence = await client.eval(
        _ACQUIRE,
        2,
        keys.lease(stream),
        keys.fence(stream),
        head + '"fence":',
        tail,
        _ttl_ms(ttl_s),
        max(0, floor),
        daemon_id,
    )
    if fence is None:
        return None
    return LeaseRecord(stream, daemon_id, int(fence), acquired_at)


async def renew(client: RedisClient, keys: Keys, record: LeaseRecord, *, ttl_s: float) -> bool:
    """Extend the lease if it is still ``record``; False when it expired or is another's."""
    renewed = await client.eval(
        _RENEW, 1, keys.lease(record.stream), record.to_json(), _ttl_ms(ttl_s)
    )
    return bool(renewed)


async def release(client: RedisClient, keys: Keys, record: LeaseRecord) -> bool:
    """Delete the lease if it is still ``record``; False when it was not ours any more."""
    deleted = await client.eval(_RELEASE, 1, keys.lease(record.stream), record.to_json())
    return bool(deleted)


def _ttl_ms(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))


@dataclass(frozen=True, slots=True)
class HeldLease:
    """A lease this daemon holds, and when (monotonic) its last successful renewal started."""

    record: LeaseRecord
    renewed_mono: float


@dataclass(frozen=True, slots=True)
class Beat:
    """What one heartbeat found."""

    lost: tuple[str, ...]  # someone else's now: stop at once
    lapsed: dict[str, LeaseRecord]  # not renewed within the TTL: free (take again) or lost?
    retaken: dict[str, LeaseRecord]  # gone from Redis while trusted: held again, a new fence


@dataclass(frozen=True, slots=True)
class LeaseView:
    """What status shows of one held lease."""

    stream: str
    fence: int
    age_s: float  # seconds since it was acquired (wall clock)
    renewed_s_ago: float  # seconds since its last successful renewal (monotonic)


class Leases:
    """The leases one daemon holds: acquire, renew (the heartbeat), give up, release.

    Not thread-safe; used from the event loop only. ``beat()`` returns the streams lost since
    the last beat; the caller stops them.
    """

    def __init__(
        self,
        keys: Keys,
        daemon_id: str,
        ttl_s: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self.daemon_id = daemon_id
        self.ttl_s = ttl_s
        self._monotonic = monotonic
        self._clock = clock
        self._held: dict[str, HeldLease] = {}

    @property
    def beat_s(self) -> float:
        return self.ttl_s / 3.0

    def owned(self) -> tuple[str, ...]:
        return tuple(self._held)

    def record(self, stream: str) -> LeaseRecord | None:
        held = self._held.get(stream)
        return None if held is None else held.record

    def trusted(self, stream: str) -> bool:
        """Whether the lease still certainly holds, by this process's own clock."""
        held = self._held.get(stream)
        if held is None:
            return False
        return self._monotonic() - held.renewed_mono < self.ttl_s * (1.0 - TRUST_MARGIN)

    def views(self) -> tuple[LeaseView, ...]:
        now, mono = self._clock(), self._monotonic()
        return tuple(
            LeaseView(name, h.record.fence, max(0.0, now - h.record.acquired_at),
                      max(0.0, mono - h.renewed_mono))
            for name, h in self._held.items()
        )  # fmt: skip

    async def try_acquire(
        self, client: RedisClient, stream: str, *, floor: int = 0
    ) -> LeaseRecord | None:
        """Take ``stream``'s lease if it is free; None when another daemon holds it."""
        started = self._monotonic()
        record = await acquire(
            client, self._keys, stream, self.daemon_id, ttl_s=self.ttl_s, floor=floor,
            now=self._clock(),
        )  # fmt: skip
        if record is not None:
            self._held[stream] = HeldLease(record, started)
        return record

    async def beat(self, client: RedisClient) -> Beat:
        """Renew every held lease; say which were lost, lapsed or re-taken.

        Trust is checked first, by the monotonic clock, before any renewal: a lease not renewed
        within its TTL (a paused process, Redis away too long) has *lapsed* and is forgotten;
        the caller finds out whether it is free (take it again) or someone else's (stop). A
        renewal that finds the lease someone else's loses it (one warning line). One that finds
        it absent while still trusted (Redis restarted empty, or flushed) takes it again at
        once, with a new fence: nobody else can have held it meanwhile.
        """
        lapsed = {}
        for name in [n for n in self._held if not self.trusted(n)]:
            lapsed[name] = self._held.pop(name).record
        lost: list[str] = []
        retaken: dict[str, LeaseRecord] = {}
        for name, held in list(self._held.items()):
            started = self._monotonic()
            try:
                if await renew(client, self._keys, held.record, ttl_s=self.ttl_s):
                    self._held[name] = HeldLease(held.record, started)
                    continue
                again = await acquire(
                    client, self._keys, name, self.daemon_id, ttl_s=self.ttl_s,
                    floor=held.record.fence, now=self._clock(),
                )  # fmt: skip
            except REDIS_DOWN_ERRORS:
                if not self.trusted(name):
                    lapsed[name] = self._held.pop(name).record
                continue
            if again is not None:
                self._held[name] = HeldLease(again, started)
                retaken[name] = again
                log.info("lease of stream %r was gone from Redis; taken again (fence %d)",
                         name, again.fence)  # fmt: skip
            else:
                lost.append(name)
                self.lose(name, "another daemon holds it now")
        return Beat(tuple(lost), lapsed, retaken)

    def give_up(self, stream: str) -> LeaseRecord | None:
        """Forget ``stream``'s lease without touching Redis (it expires by itself)."""
        held = self._held.pop(stream, None)
        return None if held is None else held.record

    async def release(self, client: RedisClient, stream: str) -> bool:
        """Release one lease (a clean hand-over); False when it was no longer ours."""
        record = self.give_up(stream)
        return record is not None and await release(client, self._keys, record)

    async def release_all(self, client: RedisClient, streams: Iterable[str] | None = None) -> None:
        """Release every held lease (clean stop); best effort, they expire anyway."""
        for name in list(self._held if streams is None else streams):
            try:
                await self.release(client, name)
            except REDIS_DOWN_ERRORS as exc:
                log.warning("could not release the lease of %r (it expires by itself): %s",
                            name, exc)  # fmt: skip

    def lose(self, stream: str, why: str, fence: int | None = None) -> None:
        """Forget ``stream``'s lease (if held) and say so in one warning line."""
        held = self._held.pop(stream, None)
        shown = fence if held is None else held.record.fence
        log.warning("lease of stream %r (fence %s) lost: %s; it stops here at once",
                    stream, shown, why)  # fmt: skip


__all__ = ["Beat", "HeldLease", "LeaseView", "Leases", "acquire", "release", "renew"]
