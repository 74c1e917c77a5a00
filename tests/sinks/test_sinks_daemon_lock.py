"""One daemon per daemon id (its presence record), and Redis refusing us (auth, ACL), on a real
redis-server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis_harness import RedisServer, free_port

from sinks.connection import RedisState
from sinks.daemon_lock import DaemonLock
from sinks.errors import BusAccessDenied, DaemonConflict
from sinks.fleet.records import read_daemons
from sinks.fleet.settings import FleetSettings
from sinks.settings import Keys, QuerySettings, RedisSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
PASSWORD = "s3cret-pw"


def settings(url: str, **overrides: Any) -> RedisSettings:
    fields: dict[str, Any] = {
        "url": url,
        "connect_timeout_s": 1.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
    }
    return RedisSettings(**(fields | overrides))


def lock_for(url: str, daemon_id: str = "d1", **overrides: Any) -> DaemonLock:
    return DaemonLock(
        settings(url, **overrides),
        QuerySettings(consumer_name="test-lock"),
        FleetSettings(daemon_id=daemon_id),
        streams=lambda: (("cam",), ()),
    )


def presence(**fields: Any) -> str:
    """A presence record as another daemon would write it."""
    record = {"daemon": "d1", "started_at": 0, "expires_at": time.time() + 600, "extra": {}}
    return json.dumps(record | fields)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that requires a password (``--requirepass``)."""
    server = RedisServer(tmp_path, ("--requirepass", PASSWORD))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def with_password(url: str, user: str = "", password: str = PASSWORD) -> str:
    return url.replace("redis://", f"redis://{user}:{password}@")


async def test_a_second_daemon_on_the_same_prefix_is_refused(redis_server: str) -> None:
    first, second = lock_for(redis_server), lock_for(redis_server)
    assert await first.try_acquire()
    with pytest.raises(DaemonConflict, match=r"another flashwatch daemon \(pid \d+ on .*since"):
        await second.try_acquire()
    other_prefix = lock_for(redis_server, prefix="other")
    assert await other_prefix.try_acquire()  # another deployment on the same Redis is fine
    other_id = lock_for(redis_server, daemon_id="d2")
    assert await other_id.try_acquire()  # another daemon of the fleet is fine too
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    daemons = await read_daemons(client, Keys())
    await client.aclose()
    assert sorted(daemons) == ["d1", "d2"] and daemons["d1"].serves == ("cam",)
    assert daemons["d1"].pid == os.getpid() and daemons["d1"].alive()
    await other_id.release()
    assert await first.try_acquire()  # a renewal of one's own lock
    await first.release()
    assert await second.try_acquire()
    await second.release()
    await other_prefix.release()


async def test_a_killed_daemons_lock_expires(redis_server: str) -> None:
    killed = lock_for(redis_server, lock_ttl_s=1.0)
    assert await killed.try_acquire()  # then never renewed nor released, like after SIGKILL
    successor = lock_for(redis_server, lock_ttl_s=1.0)
    with pytest.raises(DaemonConflict):
        await successor.try_acquire()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert await successor.try_acquire()
            break
        except DaemonConflict:
            assert time.monotonic() < deadline, "the dead daemon's lock never expired"
            await asyncio.sleep(0.2)
    await successor.release()


async def test_a_gone_daemon_on_this_host_is_replaced_at_once(redis_server: str) -> None:
    finished = subprocess.Popen(["true"])  # a pid that has just ended
    finished.wait()
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    here = socket.gethostname()
    try:
        alive = presence(pid=os.getppid(), host=here, extra={"token": "a"})
        await client.hset(Keys().daemons, "d1", alive)
        with pytest.raises(DaemonConflict, match=rf"pid {os.getppid()} on"):
            await lock_for(redis_server).try_acquire()  # alive: never taken over
        dead = presence(pid=finished.pid, host=here, extra={"token": "d"})
        await client.hset(Keys().daemons, "d1", dead)
        lock = lock_for(redis_server)
        assert await lock.try_acquire()  # no wait for the expiry
        assert '"token":"d"' not in (await client.hget(Keys().daemons, "d1") or "")
        await lock.release()
        assert not await client.hexists(Keys().daemons, "d1")  # a clean stop removes it
    finally:
        await client.aclose()


async def test_the_heartbeat_renews_and_notices_a_takeover(redis_server: str) -> None:
    lock = lock_for(redis_server, lock_ttl_s=1.0)
    task = asyncio.get_running_loop().create_task(lock.run())
    try:
        await asyncio.wait_for(lock.owned.wait(), 10)
        await asyncio.sleep(1.5)  # past the TTL: still held, thanks to the heartbeat
        with pytest.raises(DaemonConflict):
            await lock_for(redis_server).try_acquire()
        client = aioredis.Redis.from_url(redis_server, decode_responses=True)
        holder = presence(pid=1, host="elsewhere", extra={"token": "x"})
        await client.hset(Keys().daemons, "d1", holder)
        await client.aclose()
        with pytest.raises(DaemonConflict, match=r"pid 1 on elsewhere.*has taken over"):
            await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_unreachable_redis_is_a_state_not_an_error(
    redis_server_handle: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    lock = lock_for(url)
    with caplog.at_level(logging.INFO, logger="sinks.daemon_lock"):
        assert await lock.try_acquire() is False
    assert lock.health.state is RedisState.UNREACHABLE
    assert "is unreachable" in (lock.health.last_error or "")
    assert any(r.levelno == logging.WARNING and "retrying" in r.message for r in caplog.records)
    assert not lock.owned.is_set()


async def test_the_lock_is_taken_once_redis_comes_up(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    lock = lock_for(server.url)
    task = asyncio.get_running_loop().create_task(lock.run())
    try:
        await asyncio.sleep(0.5)
        assert lock.health.state is RedisState.UNREACHABLE and not lock.owned.is_set()
        server.start()
        await asyncio.wait_for(lock.owned.wait(), 10)
        assert lock.health.state is RedisState.CONNECTED
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.stop()


@pytest.mark.parametrize(
    ("password", "reason"),
    [("wrong-pw", "wrong user name or password"), ("", "requires a password")],
)
async def test_wrong_or_missing_password_is_authentication_failed(
    secured: RedisServer, password: str, reason: str
) -> None:
    url = with_password(secured.url, password=password) if password else secured.url
    lock = lock_for(url)
    with pytest.raises(BusAccessDenied) as raised:
        await lock.try_acquire()
    message = str(raised.value)
    assert "authentication failed" in message and reason in message
    assert "unreachable" not in message
    assert "\n" not in message and "wrong-pw" not in message
    assert lock.health.state is RedisState.AUTH_FAILED


async def test_the_right_password_serves(secured: RedisServer) -> None:
    lock = lock_for(with_password(secured.url))
    assert await lock.try_acquire()
    await lock.release()


async def _acl_user(server: RedisServer, name: str, *rules: str) -> str:
    admin = aioredis.Redis.from_url(with_password(server.url), decode_responses=True)
    await admin.execute_command("ACL", "SETUSER", name, "on", ">user-pw", *rules)
    await admin.aclose()
    return with_password(server.url, user=name, password="user-pw")


@pytest.mark.parametrize(
    ("rules", "missing"),
    [
        (("~flashwatch:*", "&flashwatch:*", "+@all", "-xgroup"), "lacks +xgroup"),
        (("~flashwatch:*", "&flashwatch:*", "+@all", "-xautoclaim", "-eval"),
         "lacks +xautoclaim, +eval"),
        (("~flashwatch:*", "+@all"), "+publish on channels &flashwatch:*"),
        (("~other:*", "&flashwatch:*", "+@all"), "+xgroup on keys ~flashwatch:*"),
    ],
)  # fmt: skip
async def test_an_acl_user_without_a_permission_is_named_at_start(
    secured: RedisServer, rules: tuple[str, ...], missing: str
) -> None:
    url = await _acl_user(secured, "limited", *rules)
    with pytest.raises(BusAccessDenied) as raised:
        await lock_for(url).try_acquire()
    assert "ACL user 'limited'" in str(raised.value) and missing in str(raised.value)
    assert "user-pw" not in str(raised.value)


async def test_an_acl_user_with_every_permission_serves(secured: RedisServer) -> None:
    url = await _acl_user(secured, "daemon", "~flashwatch:*", "&flashwatch:*", "+@all")
    lock = lock_for(url)
    assert await lock.try_acquire()
    await lock.release()


async def test_a_password_rotated_under_a_running_daemon_is_a_warning_and_a_state(
    secured: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    lock = lock_for(with_password(secured.url), lock_ttl_s=1.0)
    assert await lock.try_acquire()
    admin = aioredis.Redis.from_url(with_password(secured.url), decode_responses=True)
    try:
        await admin.config_set("requirepass", "rotated-pw")
        with caplog.at_level(logging.WARNING, logger="sinks.daemon_lock"):
            assert await lock.try_acquire() is False  # a state now, no longer an error
        assert lock.health.state is RedisState.AUTH_FAILED
        assert "authentication failed" in (lock.health.last_error or "")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "authentication failed" in warnings[0].message
        await admin.config_set("requirepass", PASSWORD)
        assert await lock.try_acquire()
        assert lock.health.state is RedisState.CONNECTED
    finally:
        await admin.config_set("requirepass", PASSWORD)
        await admin.aclose()
        await lock.release()
