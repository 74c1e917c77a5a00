"""Routing over a real redis-server: owners simulated by leases, presence and inbox intakes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest

from sinks.client import ask, ask_stream, cancel
from sinks.fleet.records import DaemonRecord, LeaseRecord
from sinks.fleet.router import FleetRouter
from sinks.fleet.settings import FleetSettings
from sinks.intake import QueryIntake
from sinks.replies import ReplyPublisher
from sinks.schema import error_event
from sinks.settings import Keys
from streamer.engine.errors import EmptyMemory, QueryCancelled, UnknownStream

KEYS = Keys()
LEASE_MS = 60_000


async def own(client: Any, stream: str, daemon: str, fence: int = 1) -> None:
    record = LeaseRecord(stream, daemon, fence, time.time())
    await client.set(KEYS.lease(stream), record.to_json(), px=LEASE_MS)


async def present(client: Any, daemon: str, serves: Collection[str], *, alive: bool = True) -> None:
    now = time.time()
    record = DaemonRecord(
        daemon, "host", 1, now - 10, now + (60 if alive else -60), serves=tuple(serves)
    )
    await client.hset(KEYS.daemons, daemon, record.to_json())


@contextlib.asynccontextmanager
async def owner(kit: Any, daemon: str, *, delay_s: float = 0.0) -> AsyncIterator[Any]:
    """A fake owner: an intake on its inbox answering with the fake engine."""
    redis, query = kit.redis_settings(kit.url), kit.query_settings(consumer_name=daemon)
    replies = ReplyPublisher(redis, query, daemon_id=daemon)
    engine = kit.FakeEngine(replies, delay_s=delay_s)
    intake = QueryIntake(
        redis, query, submit=engine.submit, cancel=engine.cancel, replies=replies,
        stream_key=KEYS.inbox(daemon), channels=False,
    )  # fmt: skip
    task = asyncio.create_task(intake.run())
    try:
        await kit.wait_until(lambda: intake.connected)
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await replies.aclose()


@contextlib.asynccontextmanager
async def coordinator(
    kit: Any, local: Collection[str] = (), **fleet: Any
) -> AsyncIterator[tuple[QueryIntake, FleetRouter]]:
    """The coordinator "c": the shared request stream with a router; serves ``local``."""
    redis, query = kit.redis_settings(kit.url), kit.query_settings(consumer_name="c")
    replies = ReplyPublisher(redis, query, daemon_id="c")
    engine = kit.FakeEngine(replies)
    settings = FleetSettings(daemon_id="c", **{"owner_wait_s": 0.3, **fleet})
    router = FleetRouter(redis, query, settings, replies=replies, local=lambda: set(local))

    def cancel(request_id: str) -> None:  # as the daemon wires it
        if not router.cancel(request_id):
            engine.cancel(request_id)

    intake = QueryIntake(
        redis, query, submit=engine.submit, cancel=cancel, replies=replies, router=router
    )
    tasks = [asyncio.create_task(intake.run()), asyncio.create_task(router.run())]
    try:
        await kit.wait_until(lambda: intake.connected)
        yield intake, router
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await router.aclose()
        await replies.aclose()


async def test_a_request_over_two_owners_is_one_merged_answer(kit: Any) -> None:
    client = kit.client()
    await own(client, "cam1", "d1")
    await own(client, "cam2", "d2")
    async with owner(kit, "d1"), owner(kit, "d2"), coordinator(kit) as (intake, router):
        final = await ask(kit.url, "what?", stream=["cam2", "cam1"], timeout_s=30)
        assert intake.counters["routed"] == 1
        await kit.wait_until(lambda: router.counters["delivered"] == 1)
        await kit.wait_until(lambda: intake.in_flight_entries == 0)
    assert final["daemon"] == "c"
    assert [(s["stream"], s["daemon"]) for s in final["sections"]] == [
        (["cam2"], "d2"),
        (["cam1"], "d1"),
    ]
    assert sorted(final["stream"]) == ["cam1", "cam2"]
    starts = [span["start"] for span in final["evidence"]]
    assert starts == sorted(starts)
    assert (await client.xpending(KEYS.requests, "flashwatch"))["pending"] == 0
    await client.aclose()


async def test_a_lone_owners_tokens_reach_the_client(kit: Any) -> None:
    client = kit.client()
    await own(client, "cam1", "d1")
    async with owner(kit, "d1", delay_s=0.5), coordinator(kit):
        events = [e async for e in ask_stream(kit.url, "what?", stream="cam1", timeout_s=30)]
    tokens = [e["text"] for e in events if e["type"] == "token"]
    final = events[-1]
    assert final["type"] == "final" and final["sections"][0]["daemon"] == "d1"
    assert len(tokens) > 1 and "".join(tokens) == final["sections"][0]["answer"], events
    await client.aclose()


async def test_local_streams_take_the_lone_daemon_path(kit: Any) -> None:
    client = kit.client()
    await own(client, "cam1", "c")
    async with coordinator(kit, local={"cam1"}) as (intake, _router):
        final = await ask(kit.url, "what?", stream="cam1", timeout_s=30)
        assert intake.counters["routed"] == 0
    assert final["daemon"] == "c" and final["sections"] == []
    await client.aclose()


async def test_star_covers_every_fleet_stream(kit: Any) -> None:
    client = kit.client()
    await present(client, "d1", ["cam1"])
    await present(client, "d2", ["cam2"])
    await own(client, "cam1", "d1")
    await own(client, "cam2", "d2")
    async with owner(kit, "d1"), owner(kit, "d2"), coordinator(kit):
        final = await ask(kit.url, "what?", stream="*", timeout_s=30)
    assert {s["daemon"] for s in final["sections"]} == {"d1", "d2"}
    await client.aclose()


async def test_a_stream_without_owner_is_named_after_the_wait(kit: Any) -> None:
    client = kit.client()
    await present(client, "d1", ["cam1", "cam3"])
    await own(client, "cam1", "d1")
    async with owner(kit, "d1"), coordinator(kit):
        final = await ask(kit.url, "what?", stream=["cam1", "cam3"], timeout_s=30)
    sections = {tuple(s["stream"]): s for s in final["sections"]}
    assert sections[("cam3",)]["error"] == "no_owner"
    assert [g["stream"] for g in final["gaps"] if g["reason"] == "no_owner"] == ["cam3"]
    await client.aclose()


async def test_a_stream_nobody_knows_is_unknown(kit: Any) -> None:
    client = kit.client()
    await own(client, "cam1", "d1")
    async with owner(kit, "d1"), coordinator(kit):
        with pytest.raises(UnknownStream, match="nope"):
            await ask(kit.url, "what?", stream=["cam1", "nope"], timeout_s=30)
    await client.aclose()


async def test_a_part_from_an_old_owner_is_asked_again_of_the_new_one(kit: Any) -> None:
    client = kit.client()
    await own(client, "cam1", "d1", fence=1)
    async with owner(kit, "d1", delay_s=2.0), owner(kit, "d2"), coordinator(kit) as (_i, router):
        asking = asyncio.create_task(ask(kit.url, "what?", stream="cam1", timeout_s=30))
        await kit.wait_until(lambda: client.xlen(KEYS.inbox("d1")))
        await own(client, "cam1", "d2", fence=2)  # d1 lost it while answering
        final = await asking
    assert [s["daemon"] for s in final["sections"]] == ["d2"]
    assert final["daemon"] == "c"
    assert router.counters["resent"] == 1
    await client.aclose()


async def test_two_coordinators_deliver_one_final(kit: Any) -> None:
    redis, query = kit.redis_settings(kit.url), kit.query_settings()
    async with ReplyPublisher(redis, query) as replies:
        first = await replies.deliver_once("q9", None, json.dumps({"type": "final", "n": 1}))
        second = await replies.deliver_once("q9", None, json.dumps({"type": "final", "n": 2}))
    client = kit.client()
    assert (first, second) == (True, False)
    assert json.loads(await client.get(KEYS.answer("q9")))["n"] == 1
    await client.aclose()


async def test_dead_daemons_inboxes_are_swept(kit: Any) -> None:
    client = kit.client()
    await present(client, "gone", ["cam9"], alive=False)
    await present(client, "live", ["cam8"])
    await client.xadd(KEYS.inbox("gone"), {"request": "{}"})
    await client.xadd(KEYS.inbox("live"), {"request": "{}"})
    async with coordinator(kit) as (_intake, router):
        await kit.wait_until(lambda: router.counters["swept"] == 1)
    assert not await client.exists(KEYS.inbox("gone"))
    assert await client.exists(KEYS.inbox("live"))
    await client.aclose()


async def test_a_killed_daemons_stream_is_no_owner_not_unknown(kit: Any) -> None:
    client = kit.client()
    await present(client, "killed", ["cam7"], alive=False)  # its record outlives it
    async with coordinator(kit, local={"cam1"}) as (intake, _router):
        final = await ask(kit.url, "what?", stream=["cam7"], timeout_s=30)
        assert intake.counters["routed"] == 1
    assert [(s["stream"], s["error"]) for s in final["sections"]] == [(["cam7"], "no_owner")]
    await client.aclose()


async def test_an_owners_error_on_its_only_part_reaches_the_client(kit: Any) -> None:
    client = kit.client()
    await own(client, "cam1", "d1")

    async def owner_without_memory() -> None:  # answers each sub-request with an error
        last = "0"
        while True:
            for _stream, entries in await client.xread({KEYS.inbox("d1"): last}, block=1000):
                for entry_id, fields in entries:
                    last = entry_id
                    sub_id = json.loads(fields["request"])["id"]
                    await client.set(
                        KEYS.answer(sub_id), error_event(sub_id, "empty_memory", "no clips yet")
                    )

    fake = asyncio.create_task(owner_without_memory())
    try:
        async with coordinator(kit):
            with pytest.raises(EmptyMemory, match="no clips yet"):
                await ask(kit.url, "what?", stream="cam1", timeout_s=30)
    finally:
        fake.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fake
    await client.aclose()


async def test_cancelling_a_routed_request_cancels_its_parts(kit: Any) -> None:
    client = kit.client()
    await own(client, "cam1", "d1")
    heard = client.pubsub(ignore_subscribe_messages=True)
    await heard.subscribe(KEYS.cancel)  # what an owner's request intake hears
    async with owner(kit, "d1", delay_s=5.0), coordinator(kit) as (_intake, router):
        asking = asyncio.create_task(ask(kit.url, "what?", stream="cam1", request_id="q-c"))
        await kit.wait_until(lambda: client.xlen(KEYS.inbox("d1")))  # its part is out
        assert router.coordinating == 1 and not router.cancel("someone-else")
        await cancel(kit.url, "q-c")  # the client's cancel message, heard by every intake
        with pytest.raises(QueryCancelled):
            await asking
    messages: list[str] = []
    deadline = time.monotonic() + 5.0
    while len(messages) < 2 and time.monotonic() < deadline:
        message = await heard.get_message(timeout=0.5)  # None: the subscription's own reply
        if message is not None:
            messages.append(message["data"])
    assert len(messages) == 2, messages
    assert messages[0] == "q-c" and messages[1].startswith("q-c:d1:"), messages
    await heard.aclose()
    await client.aclose()


async def test_a_forget_for_another_owners_stream_is_left_to_it(kit: Any) -> None:
    client = kit.client()
    await own(client, "cam1", "d1")
    forgotten: list[str] = []

    async def forget_here(request: Any) -> None:
        forgotten.append(request.stream)

    redis, query = kit.redis_settings(kit.url), kit.query_settings(consumer_name="c")
    replies = ReplyPublisher(redis, query, daemon_id="c")
    router = FleetRouter(
        redis, query, FleetSettings(daemon_id="c"), replies=replies, local=lambda: {"cam2"}
    )
    intake = QueryIntake(
        redis, query, submit=kit.FakeEngine(replies).submit, cancel=lambda _id: None,
        forget=forget_here, replies=replies, router=router,
    )  # fmt: skip
    task = asyncio.create_task(intake.run())
    try:
        await kit.wait_until(lambda: intake.connected)
        for stream in ("cam1", "cam2"):
            message = {"v": 1, "id": f"f-{stream}", "stream": stream, "since": 0, "until": 10}
            await client.publish(KEYS.forget, json.dumps(message))
        await kit.wait_until(lambda: forgotten == ["cam2"])
        await kit.wait_until(lambda: client.exists(KEYS.answer("f-cam2")))
        assert not await client.exists(KEYS.answer("f-cam1"))  # d1, its owner, answers it
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await router.aclose()
        await replies.aclose()
        await client.aclose()
