"""The query service on a real three-master Redis Cluster: client → intake → fake engine →
replies, deduplication, answer storage, and the key layout (one slot per request and per camera,
checked with the cluster's own CLUSTER KEYSLOT)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from sinks import ask
from sinks.connection import is_cluster, open_pubsub
from sinks.fleet.records import DaemonRecord, LeaseRecord
from sinks.fleet.status import read_fleet
from sinks.schema import DaemonInfo, DaemonStatus, StreamStatus
from sinks.settings import Keys, RedisSettings, StatusSettings, cluster_nodes
from sinks.status import StatusPublisher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
KEYS = Keys("flashwatch")
GROUP = "flashwatch"


def request_json(request_id: str) -> str:
    return json.dumps({"id": request_id, "stream": "cam1", "question": "what colour?"})


# ---- the URL (no server needed) -------------------------------------------------------------


def test_cluster_url_names_its_seed_nodes() -> None:
    url = "redis+cluster://user:pw@10.0.0.1:7000,[::1]:7001,redis-2:7002/0"
    assert cluster_nodes(url) == [("10.0.0.1", 7000), ("::1", 7001), ("redis-2", 7002)]
    assert RedisSettings(url=url).url == url
    assert "pw" not in repr(RedisSettings(url=url))


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://host-without-port",
        "redis+cluster://h:1,h:not-a-port",
        "redis+cluster://h:70000",
        "redis+cluster://h:7000/2",  # a Cluster has database 0 only
        "cluster://h:7000",
    ],
)
def test_malformed_cluster_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValidationError):
        RedisSettings(url=url)


def test_every_key_of_a_request_and_of_a_camera_shares_one_hash_tag() -> None:
    # Pure: the tag is the text between the first { and the next }.
    assert {_tag(KEYS.answer("q1")), _tag(KEYS.seen("q1")), _tag(KEYS.reply("q1"))} == {"q1"}
    assert {_tag(KEYS.lease("gate")), _tag(KEYS.fence("gate"))} == {"gate"}


def _tag(key: str) -> str:
    start = key.index("{")
    return key[start + 1 : key.index("}", start)]


# ---- against the cluster --------------------------------------------------------------------


def test_keys_of_one_request_and_one_camera_map_to_one_slot(cluster_kit: Any) -> None:
    redis_cluster = cluster_kit.server
    slots_by_id = {}
    for request_id in ("q1", "req-42", "7f3a9c", "a.b:c"):
        slots = {
            redis_cluster.keyslot(key)
            for key in (KEYS.answer(request_id), KEYS.seen(request_id), KEYS.reply(request_id))
        }
        assert len(slots) == 1, (request_id, slots)
        slots_by_id[request_id] = slots.pop()
    # Different requests are spread over the cluster, not pinned to one slot.
    assert len(set(slots_by_id.values())) > 1
    for stream in ("gate", "cam-7"):
        assert redis_cluster.keyslot(KEYS.lease(stream)) == redis_cluster.keyslot(
            KEYS.fence(stream)
        )


async def test_ask_is_answered_and_stored_on_the_cluster(cluster_kit: Any) -> None:
    url = cluster_kit.url
    async with cluster_kit.serve() as (_intake, engine):
        answer = await ask(url, "what colour?", stream="cam1", timeout_s=30, request_id="c1")
        quick = await ask(url, "and now?", stream="cam1", timeout_s=30, durable=False)
    assert answer["type"] == "final" and answer["answer"] == "it was red"
    assert quick["type"] == "final" and quick["id"] != "c1"
    assert [ticket.request.id for ticket in engine.tickets] == ["c1", quick["id"]]
    client = cluster_kit.client()
    try:
        assert is_cluster(client)
        stored = json.loads(await client.get(KEYS.answer("c1")))
        assert stored == answer
        assert 0 < await client.ttl(KEYS.answer("c1")) <= 3600
        # The final was acked: nothing left pending in the request stream's group.
        assert int((await client.xpending(KEYS.requests, GROUP))["pending"]) == 0
    finally:
        await client.aclose()


async def test_duplicate_ids_are_answered_once_on_the_cluster(cluster_kit: Any) -> None:
    url = cluster_kit.url
    client = cluster_kit.client()
    finals: list[dict[str, Any]] = []
    pubsub = await open_pubsub(client, ignore_subscribe_messages=True)
    await pubsub.subscribe(KEYS.reply("dup"))
    try:
        async with cluster_kit.serve(delay_s=0.3) as (intake, engine):
            await client.xadd(KEYS.requests, {"request": request_json("dup")})
            await client.xadd(KEYS.requests, {"request": request_json("dup")})

            async def one_final() -> bool:
                message = await pubsub.get_message(timeout=0.1)
                if message and json.loads(message["data"])["type"] == "final":
                    finals.append(json.loads(message["data"]))
                return len(finals) == 1

            await cluster_kit.wait_until(one_final)
            again = await ask(url, "what colour?", request_id="dup", timeout_s=30)
            await cluster_kit.wait_until(lambda: intake.counters["duplicate"] == 1)
        assert len(engine.tickets) == 1
        assert again == finals[0]
        assert await client.exists(KEYS.seen("dup")) == 1
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_fleet_status_reads_leases_and_snapshots_across_slots(cluster_kit: Any) -> None:
    """Leases of several cameras (several slots) and each daemon's status, through pipelines
    without a transaction; the status is published and stored per daemon on the cluster."""
    now = time.time()
    streams = ("gate", "dock", "yard", "lot")
    assert len({cluster_kit.server.keyslot(KEYS.lease(s)) for s in streams}) > 1
    client = cluster_kit.client()
    pubsub = await open_pubsub(client, ignore_subscribe_messages=True)
    await pubsub.subscribe(KEYS.status)
    publisher = StatusPublisher(
        cluster_kit.redis_settings(cluster_kit.url), StatusSettings(), daemon_id="a"
    )
    try:
        for index, (daemon_id, owned) in enumerate((("a", streams[:2]), ("b", streams[2:]))):
            record = DaemonRecord(daemon_id, "h", index, now - 5, now + 30, owned, owned)
            await client.hset(KEYS.daemons, daemon_id, record.to_json())
            for stream in owned:
                lease = LeaseRecord(stream, daemon_id, index + 1, now - 1)
                await client.set(KEYS.lease(stream), lease.to_json(), ex=30)
        status = DaemonStatus(
            time=now,
            daemon=DaemonInfo(
                pid=1, started_at=now, uptime_s=0, version="0", model="m", device="cpu"
            ),
            streams=(StreamStatus(name="gate", url="file:///g.mp4", state="live"),),
        )
        assert await publisher.publish(status)
        published: list[dict[str, Any]] = []

        async def heard() -> bool:
            # None also for the subscribe confirmation (ignored): poll until the snapshot.
            message = await pubsub.get_message(timeout=0.1)
            if message is not None:
                published.append(json.loads(message["data"]))
            return bool(published)

        await cluster_kit.wait_until(heard)
        assert published[0]["time"] == now
        assert json.loads(await client.get(KEYS.status_of("a")))["time"] == now
        view = await read_fleet(client, KEYS)
    finally:
        await publisher.aclose()
        await pubsub.aclose()
        await client.aclose()
    owners = {s.name: s.owner for s in view.streams}
    assert owners == {"gate": "a", "dock": "a", "yard": "b", "lot": "b"}
    assert {s.name: s.state for s in view.streams}["gate"] == "live"
    assert [d.daemon_id for d in view.daemons if d.state == "live"] == ["a", "b"]
