"""INTERIM — replaced by ``sinks.fleet.leases``: a minimal lease and presence writer.

Routing needs to know who owns which stream. Until the fleet's lease code (fencing Lua
scripts, placement, failover) is in, each daemon claims every stream it is configured with:
a fence from INCR, the lease with SET NX PX, renewed (PEXPIRE) while it is still ours, and a
presence record in ``Keys.daemons``, all in the formats of ``sinks.fleet.records``. Leases and
presence are removed at a clean stop. No adoption, no fencing of writes: a stream another daemon
already holds is simply not claimed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Collection

from sinks.connection import REDIS_DOWN_ERRORS, open_redis
from sinks.fleet.records import DaemonRecord, LeaseRecord
from sinks.fleet.settings import FleetSettings
from sinks.settings import Keys, RedisSettings

log = logging.getLogger(__name__)


class InterimLeases:
    """Claims and renews the leases of ``streams()`` every third of ``fleet.lease_ttl_s``."""

    def __init__(
        self,
        redis: RedisSettings,
        fleet: FleetSettings,
        streams: Callable[[], Collection[str]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fleet = fleet
        self._keys = Keys(redis.prefix)
        self._streams = streams
        self._clock = clock
        self._client = open_redis(redis, read_timeout_s=redis.connect_timeout_s + 5.0)
        self._started_at = clock()
        self._owned: dict[str, int] = {}  # stream -> fence

    @property
    def owned(self) -> frozenset[str]:
        return frozenset(self._owned)

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.beat()
                except REDIS_DOWN_ERRORS as exc:
                    log.debug("lease renewal skipped: %s", exc)
                await asyncio.sleep(self._fleet.lease_ttl_s / 3)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Release our leases and presence (they expire by themselves if Redis is away)."""
        await self._release()
        await self._client.aclose()

    async def beat(self) -> None:
        """Claim free leases of our streams, renew ours, refresh presence."""
        ttl_ms = int(self._fleet.lease_ttl_s * 1000)
        me = self._fleet.daemon_id
        configured = set(self._streams())
        for name in [n for n in self._owned if n not in configured]:  # removed by a reload
            del self._owned[name]
            holder = _lease(await self._client.get(self._keys.lease(name)))
            if holder is not None and holder.daemon_id == me:
                await self._client.delete(self._keys.lease(name))
        for name in configured:
            raw = await self._client.get(self._keys.lease(name))
            holder = _lease(raw)
            if holder is not None and holder.daemon_id == me:
                await self._client.pexpire(self._keys.lease(name), ttl_ms)
                self._owned[name] = holder.fence
                continue
            self._owned.pop(name, None)
            if holder is not None:
                continue  # another daemon's
            fence = int(await self._client.incr(self._keys.fence(name)))
            record = LeaseRecord(name, me, fence, self._clock())
            if await self._client.set(self._keys.lease(name), record.to_json(), nx=True, px=ttl_ms):
                self._owned[name] = fence
                log.info("claimed stream %s (fence %d)", name, fence)
        now = self._clock()
        presence = DaemonRecord(
            daemon_id=me,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self._started_at,
            expires_at=now + self._fleet.lease_ttl_s,
            serves=tuple(sorted(configured)),
            owns=tuple(sorted(self._owned)),
            weight=self._fleet.weight,
        )
        await self._client.hset(self._keys.daemons, me, presence.to_json())

    async def _release(self) -> None:
        try:
            for name in list(self._owned):
                holder = _lease(await self._client.get(self._keys.lease(name)))
                if holder is not None and holder.daemon_id == self._fleet.daemon_id:
                    await self._client.delete(self._keys.lease(name))
            await self._client.hdel(self._keys.daemons, self._fleet.daemon_id)
        except REDIS_DOWN_ERRORS as exc:
            log.info("leases not released (they expire by themselves): %s", exc)
        self._owned.clear()


def _lease(raw: str | bytes | None) -> LeaseRecord | None:
    if raw is None:
        return None
    try:
        return LeaseRecord.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return None
