"""The Redis alert channel against a real redis-server: stream, pub/sub, once per id, MAXLEN."""

from __future__ import annotations

import json
from typing import Any

import pytest
from alert_events import alert_event, running

from sinks.alerts.redis import RedisAlertSink
from sinks.settings import Keys

pytestmark = pytest.mark.integration


def make_sink(kit: Any, **overrides: Any) -> RedisAlertSink:
    fields: dict[str, Any] = {"stream_maxlen": 1000, "marker_ttl_s": 3600, "queue_size": 100}
    fields.update(overrides)
    return RedisAlertSink(kit.redis_settings(kit.url), **fields)


async def test_an_alert_lands_on_the_stream_and_on_its_channel(kit: Any) -> None:
    keys = Keys("flashwatch")
    client = kit.client()
    pubsub = client.pubsub()
    await pubsub.subscribe(keys.alert("door"))
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    event = alert_event("door", 1)
    async with running(make_sink(kit)) as sink:
        assert sink.offer(event)
        await kit.wait_until(lambda: sink.stats()["delivered"] == 1)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
    assert message is not None and json.loads(message["data"]) == event.as_dict()
    entries = await client.xrange(keys.alerts)
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields["alert_id"] == "door:1" and fields["name"] == "door"
    assert json.loads(fields["event"]) == event.as_dict()
    # The marker remembers the entry id, and expires.
    assert await client.get(keys.alert_sent("door:1")) == entries[0][0]
    assert 0 < await client.ttl(keys.alert_sent("door:1")) <= 3600
    await pubsub.aclose()
    await client.aclose()


async def test_a_redelivery_with_the_same_id_is_not_added_twice(kit: Any) -> None:
    keys = Keys("flashwatch")
    client = kit.client()
    # Two sinks, as before and after a daemon restart: the engine re-emits door:1.
    async with running(make_sink(kit)) as first:
        first.offer(alert_event("door", 1))
        await kit.wait_until(lambda: first.stats()["delivered"] == 1)
    async with running(make_sink(kit)) as second:
        second.offer(alert_event("door", 1))
        second.offer(alert_event("door", 2))
        await kit.wait_until(lambda: second.stats()["delivered"] == 2)
        assert second.stats()["duplicates"] == 1
    ids = [fields["alert_id"] for _, fields in await client.xrange(keys.alerts)]
    assert ids == ["door:1", "door:2"]
    await client.aclose()


async def test_the_stream_stays_bounded(kit: Any) -> None:
    keys = Keys("flashwatch")
    client = kit.client()
    async with running(make_sink(kit, stream_maxlen=10, queue_size=500)) as sink:
        for sequence in range(300):
            sink.offer(alert_event("door", sequence))
        await kit.wait_until(lambda: sink.stats()["delivered"] == 300)
    length = await client.xlen(keys.alerts)
    # MAXLEN ~ trims whole macro nodes (100 entries by default): near 10, far below 300.
    assert 10 <= length <= 110
    last = await client.xrevrange(keys.alerts, count=1)
    assert last[0][1]["alert_id"] == "door:299"
    await client.aclose()


async def test_a_redis_outage_is_retried_and_the_alert_stored_once(kit: Any) -> None:
    keys = Keys("flashwatch")
    async with running(make_sink(kit)) as sink:
        kit.server.stop()
        sink.offer(alert_event("door", 7))
        await kit.wait_until(lambda: sink.stats()["retried"] >= 2)
        assert sink.stats()["delivered"] == 0
        assert "unreachable" in (sink.stats()["last_error"] or "")
        kit.server.start()
        await kit.wait_until(lambda: sink.stats()["delivered"] == 1)
    client = kit.client()
    assert [f["alert_id"] for _, f in await client.xrange(keys.alerts)] == ["door:7"]
    await client.aclose()


async def test_offer_never_blocks_and_a_full_queue_drops_the_oldest(kit: Any) -> None:
    kit.server.stop()  # nothing gets through: the queue only fills
    async with running(make_sink(kit, queue_size=3)) as sink:
        for sequence in range(10):
            assert sink.offer(alert_event("door", sequence))
        await kit.wait_until(lambda: sink.stats()["retried"] >= 1)
        stats = sink.stats()
        # All ten came before the first was taken: three stayed, seven were pushed out; one
        # of the three is now in flight (being retried), two wait.
        assert stats["queued"] == 2 and stats["dropped"] == 7 and stats["delivered"] == 0
    assert not sink.offer(alert_event("door", 99))  # closed
