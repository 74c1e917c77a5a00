"""Per-stream leases with fencing, on a real redis-server: acquire, renew, release, expiry,
a fence that only grows, and an owner that finds its lease someone else's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from sinks.fleet.leases import Beat, Leases, acquire, release, renew
from sinks.fleet.records import LeaseRecord, read_leases
from sinks.settings import Keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
KEYS = Keys("fw")


@pytest.fixture
async def client(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.Redis.from_url(redis_server, decode_responses=True)
    try:
        yield connection
    finally:
        await connection.aclose()


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_acquire_is_exclusive_and_the_record_is_the_contract(
    client: aioredis.Redis,
) -> None:
    first = await acquire(client, KEYS, "cam", "a", ttl_s=5.0, now=12.5)
    assert first == LeaseRecord("cam", "a", 1, 12.5)
    assert await client.get(KEYS.lease("cam")) == first.to_json()
    assert 0 < await client.pttl(KEYS.lease("cam")) <= 5000
    assert await acquire(client, KEYS, "cam", "b", ttl_s=5.0) is None  # held
    assert (await read_leases(client, KEYS, ["cam", "other"])) == {"cam": first}


async def test_renew_and_release_only_while_ours(client: aioredis.Redis) -> None:
    mine = await acquire(client, KEYS, "cam", "a", ttl_s=1.0)
    assert mine is not None
    assert await renew(client, KEYS, mine, ttl_s=30.0)
    assert await client.pttl(KEYS.lease("cam")) > 1000
    stale = LeaseRecord("cam", "a", mine.fence - 1 if mine.fence > 1 else 99, mine.acquired_at)
    assert not await renew(client, KEYS, stale, ttl_s=30.0)  # same daemon, other fence
    other = LeaseRecord("cam", "b", mine.fence, mine.acquired_at)
    assert not await release(client, KEYS, other)
    assert await client.exists(KEYS.lease("cam"))
    assert await release(client, KEYS, mine)
    assert not await client.exists(KEYS.lease("cam"))
    assert not await renew(client, KEYS, mine, ttl_s=30.0)  # gone: never recreated


async def test_an_expired_lease_is_taken_with_a_higher_fence(client: aioredis.Redis) -> None:
    dead = await acquire(client, KEYS, "cam", "a", ttl_s=0.3)
    assert dead is not None
    for _ in range(100):
        taken = await acquire(client, KEYS, "cam", "b", ttl_s=5.0)
        if taken is not None:
            break
        await asyncio.sleep(0.05)
    assert taken is not None and taken.daemon_id == "b" and taken.fence == dead.fence + 1
    assert not await renew(client, KEYS, dead, ttl_s=5.0)  # the dead one cannot come back


async def test_the_fence_never_goes_below_the_floor_nor_back(client: aioredis.Redis) -> None:
    first = await acquire(client, KEYS, "cam", "a", ttl_s=5.0, floor=41)
    assert first is not None and first.fence == 42  # the counter was lost; the folder said 41
    assert await release(client, KEYS, first)
    second = await acquire(client, KEYS, "cam", "a", ttl_s=5.0, floor=3)
    assert second is not None and second.fence == 43
    assert await client.get(KEYS.fence("cam")) == "43"
    tag = "{cam}"
    assert tag in KEYS.lease("cam") and tag in KEYS.fence("cam")  # one Cluster slot


async def test_the_holder_renews_and_trusts_by_its_own_clock(client: aioredis.Redis) -> None:
    clock = Clock()
    leases = Leases(KEYS, "a", 3.0, monotonic=clock)
    record = await leases.try_acquire(client, "cam", floor=0)
    assert record is not None and leases.owned() == ("cam",)
    clock.now += 2.0
    assert leases.trusted("cam") and await leases.beat(client) == Beat((), {}, {})
    clock.now += 2.0  # 2 s after the last renewal: still inside 3 s minus the margin
    assert leases.trusted("cam")
    assert await client.pttl(KEYS.lease("cam")) > 2000  # renewed in Redis too
    views = leases.views()
    assert len(views) == 1 and views[0].fence == record.fence and views[0].renewed_s_ago == 2.0
    await leases.release_all(client)
    assert leases.owned() == () and not await client.exists(KEYS.lease("cam"))


async def test_a_paused_owner_gives_up_before_renewing(
    client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    leases = Leases(KEYS, "a", 3.0, monotonic=clock)
    assert await leases.try_acquire(client, "cam") is not None
    record = leases.record("cam")
    clock.now += 10.0  # SIGSTOP, then SIGCONT: its Redis key is still there, but it cannot know
    beat = await leases.beat(client)
    assert beat.lapsed == {"cam": record} and beat.lost == () and leases.owned() == ()
    assert not await renew(client, KEYS, LeaseRecord("cam", "x", 1, 0.0), ttl_s=1.0)
    with caplog.at_level(logging.WARNING, logger="sinks.fleet.leases"):
        leases.lose("cam", "another daemon holds it now", fence=1)
    lines = [r.message for r in caplog.records]
    assert len(lines) == 1 and "'cam' (fence 1) lost" in lines[0]


async def test_an_owner_finds_its_lease_someone_elses(client: aioredis.Redis) -> None:
    leases = Leases(KEYS, "a", 0.5)
    assert await leases.try_acquire(client, "cam") is not None
    await client.delete(KEYS.lease("cam"))  # as if it expired ...
    other = Leases(KEYS, "b", 5.0)
    taken = await other.try_acquire(client, "cam")  # ... and another daemon adopted it
    assert taken is not None and taken.fence == 2
    assert (await leases.beat(client)).lost == ("cam",)
    assert await client.get(KEYS.lease("cam")) == taken.to_json()  # untouched by the loser
    assert await leases.try_acquire(client, "cam") is None  # it is standby now


async def test_a_restarted_daemon_takes_its_own_lease_at_once(client: aioredis.Redis) -> None:
    killed = await acquire(client, KEYS, "cam", "a", ttl_s=600.0)  # then SIGKILLed
    assert killed is not None
    restarted = await acquire(client, KEYS, "cam", "a", ttl_s=5.0)
    assert restarted is not None and restarted.fence == killed.fence + 1
    assert not await renew(client, KEYS, killed, ttl_s=5.0)
    assert await acquire(client, KEYS, "cam", "b", ttl_s=5.0) is None


async def test_a_lease_gone_from_redis_while_trusted_is_taken_again(
    client: aioredis.Redis,
) -> None:
    leases = Leases(KEYS, "a", 5.0)
    first = await leases.try_acquire(client, "cam")
    assert first is not None
    await client.flushall()  # Redis restarted empty: the counter is gone too
    beat = await leases.beat(client)
    assert beat.lost == () and beat.lapsed == {}
    again = beat.retaken["cam"]
    assert again.fence == first.fence + 1 and leases.record("cam") == again
    assert await client.get(KEYS.lease("cam")) == again.to_json()
