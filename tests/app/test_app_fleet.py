"""The fleet reconciler on a real redis-server, with the daemon's streams and engine faked:
an owner and a standby, a lost lease stopped without a snapshot, an adoption's failover gap,
a lapsed lease taken again, and streams kept running through a Redis outage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis_harness import RedisServer

from sinks.fleet.settings import FleetSettings
from sinks.settings import Keys, RedisSettings
from streamer.app.engine_port import EnginePort
from streamer.app.fleet import FAILOVER, FleetReconciler
from streamer.app.reload import StreamSet
from streamer.ingest.settings import StreamSettings
from streamer.ingest.types import GapEvent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
CAM = StreamSettings(name="cam", url="testsrc://?size=64x48&fps=2")


class FakeStreams:
    """What the reconciler asks of StreamSet: which run, add one, remove one."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.removed: list[tuple[str, bool]] = []

    def running(self) -> tuple[str, ...]:
        return tuple(self.names)

    async def add(
        self, settings: StreamSettings, *, failover_at: float | None = None
    ) -> GapEvent | None:
        """Its restored history ends at 100 s (epoch), like EnginePort's."""
        self.names.append(settings.name)
        return (
            None if failover_at is None else GapEvent(settings.name, 100.0, failover_at, FAILOVER)
        )

    async def remove(self, name: str, *, snapshot: bool = True) -> list[str]:
        self.names.remove(name)
        self.removed.append((name, snapshot))
        return []


class FakePort:
    """What it asks of EnginePort: fences of the snapshot folder, revoking."""

    def __init__(self) -> None:
        self.claims: list[tuple[str, int]] = []
        self.revoked: list[str] = []

    async def recorded_fence(self, name: str) -> int:
        return max((f for n, f in self.claims if n == name), default=0)

    async def claim_fence(self, name: str, fence: int) -> None:
        self.claims.append((name, fence))

    def revoke(self, name: str) -> None:
        self.revoked.append(name)


class Daemon:
    def __init__(self, url: str, daemon_id: str, ttl_s: float = 1.0) -> None:
        redis = RedisSettings(url=url, connect_timeout_s=0.5, backoff_initial_s=0.05,
                              backoff_max_s=0.1)  # fmt: skip
        self.fleet = FleetReconciler(
            FleetSettings(daemon_id=daemon_id, lease_ttl_s=ttl_s), redis,
            candidates=lambda: [CAM], lock=asyncio.Lock(), clock=lambda: 160.0,
        )  # fmt: skip
        self.streams, self.port, self.gaps = FakeStreams(), FakePort(), list[GapEvent]()

    async def start(self) -> list[str]:
        owned = [s.name for s in await self.fleet.start(lambda name: 0)]
        self.streams.names = list(owned)
        self.fleet.attach(cast(StreamSet, self.streams), cast(EnginePort, self.port),
                          self.gaps.append)  # fmt: skip
        await self.fleet.claim_started()
        return owned


@pytest.fixture
async def client(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.Redis.from_url(redis_server, decode_responses=True)
    yield connection
    await connection.aclose()


async def test_a_standby_adopts_a_lost_stream_with_a_failover_gap(
    redis_server: str, client: aioredis.Redis
) -> None:
    owner, standby = Daemon(redis_server, "a"), Daemon(redis_server, "b")
    assert await owner.start() == ["cam"] and await standby.start() == []
    assert owner.port.claims == [("cam", 1)]
    await standby.fleet.step()
    assert standby.fleet.status().standby == ("cam",) and standby.streams.names == []

    await client.delete(Keys().lease("cam"))  # the owner's lease expired (it was paused) ...
    await standby.fleet.step()  # ... and the standby adopts
    assert standby.streams.names == ["cam"] and standby.port.claims == [("cam", 2)]
    assert standby.gaps == [GapEvent("cam", 100.0, 160.0, FAILOVER)]
    status: Any = standby.fleet.status()
    assert [(lease.stream, lease.fence) for lease in status.leases] == [("cam", 2)]

    await owner.fleet.step()  # the old owner renews: someone else's now
    assert owner.streams.removed == [("cam", False)] and owner.port.revoked == ["cam"]
    assert owner.fleet.leases.owned() == ()
    for daemon in (owner, standby):
        await daemon.fleet.stop()
    assert not await client.exists(Keys().lease("cam"))


async def test_streams_run_on_through_a_redis_outage_and_keep_their_lease(
    redis_server_handle: RedisServer,
) -> None:
    daemon = Daemon(redis_server_handle.url, "a", ttl_s=1.0)
    assert await daemon.start() == ["cam"]
    task = asyncio.get_running_loop().create_task(daemon.fleet.run())
    try:
        redis_server_handle.stop()
        await wait_until(lambda: daemon.fleet.status().provisional == ("cam",))
        assert daemon.streams.removed == [] and daemon.port.revoked == []  # ingest goes on
        redis_server_handle.start()  # back, and empty: the stream gets its lease again
        await wait_until(lambda: daemon.fleet.leases.owned() == ("cam",))
        assert daemon.fleet.status().provisional == () and daemon.streams.removed == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await daemon.fleet.stop()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)
