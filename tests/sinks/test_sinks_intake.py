"""The query service end to end against a real redis-server: intake → fake engine → replies
→ client. Every wait is bounded (WAIT_S in conftest)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import pytest

from sinks import ask, ask_stream
from sinks.client import cancel as send_cancel
from sinks.connection import raise_if_cancelled
from sinks.errors import BusError
from sinks.replies import ReplyPublisher
from sinks.schema import Answer, QueryRequest, QueryTicket
from sinks.settings import Keys
from streamer.engine.errors import Busy, InvalidRequest, QueryTimeout
from streamer.engine.types import Query

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
KEYS = Keys("flashwatch")
GROUP = "flashwatch"


def request_json(request_id: str, question: str = "what colour?", **fields: Any) -> str:
    return json.dumps({"id": request_id, "stream": "cam1", "question": question, **fields})


async def pending_count(redis: Any) -> int:
    info = await redis.xpending(KEYS.requests, GROUP)
    return int(info["pending"])


async def finals_on(redis: Any, request_id: str, counter: list[dict[str, Any]]) -> Any:
    """Subscribe to a reply channel; append every final/error event to ``counter``."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(KEYS.reply(request_id))

    async def collect() -> None:
        while True:
            message = await pubsub.get_message(timeout=0.1)
            if message:
                event = json.loads(message["data"])
                if event["type"] in ("final", "error"):
                    counter.append(event)

    return pubsub, asyncio.get_running_loop().create_task(collect())


async def stop(pubsub: Any, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await pubsub.aclose()


async def test_ask_end_to_end_streams_tokens_then_final(kit: Any) -> None:
    async with kit.serve() as (intake, engine):
        answer = await ask(kit.url, "what colour?", stream="cam1", since="-1h", timeout_s=10)
        assert answer["type"] == "final" and answer["answer"] == "it was red"
        assert answer["model"] == "fake" and answer["stream"] == ["cam1"]
        assert [span["start"] for span in answer["evidence"]] == [0.0, 20.0]

        events = [
            event
            async for event in ask_stream(
                kit.url, "and now?", request_id="q-stream", max_new_tokens=8, timeout_s=10
            )
        ]
        assert [e["type"] for e in events] == ["token", "token", "token", "final"]
        assert "".join(e["text"] for e in events[:3]) == "it was red"
        assert [e["index"] for e in events[:3]] == [0, 1, 2]
        assert events[-1]["id"] == "q-stream"

        ticket = engine.tickets[-1]
        assert isinstance(ticket.request, Query) and ticket.entry_id is not None
        assert ticket.request.max_new_tokens == 8 and ticket.request.stream == ("*",)
        assert engine.tickets[0].request.since is not None  # "-1h" resolved to epoch seconds
        async with kit.client() as redis:
            await kit.wait_until(lambda: _zero(pending_count(redis)))
            stored = json.loads(await redis.get(KEYS.answer("q-stream")))
            assert stored == events[-1]
            assert 0 < await redis.ttl(KEYS.answer("q-stream")) <= 3600
        assert intake.counters["submitted"] == 2


async def _zero(count: Any) -> bool:
    return await count == 0


async def test_request_added_before_intake_starts_is_answered_once(kit: Any) -> None:
    async with kit.client() as redis:
        finals: list[dict[str, Any]] = []
        pubsub, collector = await finals_on(redis, "early", finals)
        await redis.xadd(KEYS.requests, {"request": request_json("early")})
        async with kit.serve() as (_intake, engine):
            await kit.wait_until(lambda: len(finals) == 1)
            await kit.wait_until(lambda: _zero(pending_count(redis)))
        # A second daemon (another consumer name) must not answer it again.
        async with kit.serve(query=kit.query_settings(consumer_name="other")) as (_, engine2):
            await asyncio.sleep(0.3)
        await stop(pubsub, collector)
        assert [t.request.id for t in engine.tickets] == ["early"] and engine2.tickets == []
        assert len(finals) == 1 and finals[0]["answer"] == "it was red"


async def test_entry_of_a_crashed_consumer_is_claimed_and_answered_once(kit: Any) -> None:
    async with kit.client() as redis:
        await redis.xgroup_create(KEYS.requests, GROUP, id="0", mkstream=True)
        await redis.xadd(KEYS.requests, {"request": request_json("orphan")})
        # Consumer A reads the entry and "crashes": never acks.
        read = await redis.xreadgroup(GROUP, "A", {KEYS.requests: ">"}, count=10)
        assert len(read[0][1]) == 1
        assert await pending_count(redis) == 1

        finals: list[dict[str, Any]] = []
        pubsub, collector = await finals_on(redis, "orphan", finals)
        query = kit.query_settings(consumer_name="B", claim_idle_s=0.2)
        async with kit.serve(query=query) as (intake, engine):
            await kit.wait_until(lambda: len(finals) == 1)
            await kit.wait_until(lambda: _zero(pending_count(redis)))
            await asyncio.sleep(0.5)  # a few more claim sweeps: nothing is served twice
        await stop(pubsub, collector)
        assert [t.request.id for t in engine.tickets] == ["orphan"]
        assert intake.counters["claimed"] == 1 and len(finals) == 1


async def test_long_query_is_not_stolen_by_another_consumer(kit: Any) -> None:
    """A live consumer refreshes its running entries, so XAUTOCLAIM elsewhere leaves them."""
    # B refreshes every 0.3 s (claim_idle_s / 3); C claims anything idle for 0.8 s. Without
    # the refresh, C would take the entry while B's engine still works on it (1.5 s).
    query_b = kit.query_settings(consumer_name="B", claim_idle_s=0.9)
    query_c = kit.query_settings(consumer_name="C", claim_idle_s=0.8)
    async with kit.client() as redis, kit.serve(query=query_b, delay_s=1.5) as (_, engine_b):
        await redis.xadd(KEYS.requests, {"request": request_json("slow")})
        await kit.wait_until(lambda: engine_b.tickets)
        async with kit.serve(query=query_c) as (intake_c, engine_c):
            await kit.wait_until(lambda: redis.exists(KEYS.answer("slow")))
            await kit.wait_until(lambda: _zero(pending_count(redis)))
        assert len(engine_b.tickets) == 1 and engine_c.tickets == []
        assert intake_c.counters["claimed"] == 0


async def test_duplicate_ids_are_answered_once(kit: Any) -> None:
    async with kit.client() as redis:
        finals: list[dict[str, Any]] = []
        pubsub, collector = await finals_on(redis, "dup", finals)
        async with kit.serve(delay_s=0.3) as (intake, engine):
            # Two entries with one id while the first is in progress, and once more on the
            # quick path.
            await redis.xadd(KEYS.requests, {"request": request_json("dup")})
            await redis.xadd(KEYS.requests, {"request": request_json("dup")})
            await redis.publish(KEYS.ask, request_json("dup"))
            await kit.wait_until(lambda: len(finals) == 1)
            # After the answer: a retry with the same id gets the stored answer, not a new one.
            answer = await ask(kit.url, "what colour?", request_id="dup", timeout_s=10)
            await redis.xadd(KEYS.requests, {"request": request_json("dup")})
            await kit.wait_until(lambda: intake.counters["duplicate"] == 3)
            await kit.wait_until(lambda: _zero(pending_count(redis)))
        await stop(pubsub, collector)
        assert answer == finals[0]
        assert len(engine.tickets) == 1 and len(finals) == 1


async def test_reused_id_after_its_answer_expired_is_rejected(kit: Any) -> None:
    async with kit.client() as redis, kit.serve() as (_intake, engine):
        marker = json.dumps({"entry": "1-0", "consumer": "gone", "until": 1.0})
        await redis.set(KEYS.seen("old"), marker, ex=60)
        with pytest.raises(InvalidRequest, match="already used"):
            await ask(kit.url, "q", request_id="old", timeout_s=10)
        assert engine.tickets == []


async def test_bad_requests_get_invalid_request_and_service_continues(kit: Any) -> None:
    async with kit.client() as redis, kit.serve() as (intake, engine):
        # Not JSON, and no id at all: the error goes to reply:<entry id> / answer:<entry id>.
        entry_id = await redis.xadd(KEYS.requests, {"request": "{this is not json"})
        await kit.wait_until(lambda: redis.exists(KEYS.answer(entry_id)))
        event = json.loads(await redis.get(KEYS.answer(entry_id)))
        assert (event["type"], event["code"]) == ("error", "invalid_request")
        assert "JSON" in event["message"]
        # An entry without the `request` field.
        entry_id = await redis.xadd(KEYS.requests, {"question": "hi"})
        await kit.wait_until(lambda: redis.exists(KEYS.answer(entry_id)))

        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "question"),  # missing field
            ({"question": "x" * 2001}, "question"),  # huge question
            ({"question": "q", "since": "-1h", "until": "-2h"}, "since must be earlier"),
            ({"question": "q", "colour": "red"}, "colour"),
            ({"question": "q", "max_new_tokens": 5000}, "max_new_tokens"),
        ]
        for index, (fields, needle) in enumerate(cases):
            request_id = f"bad-{index}"
            finals: list[dict[str, Any]] = []
            pubsub, collector = await finals_on(redis, request_id, finals)
            await redis.xadd(KEYS.requests, {"request": json.dumps({"id": request_id, **fields})})
            await kit.wait_until(lambda finals=finals: finals)
            await stop(pubsub, collector)
            assert finals[0]["code"] == "invalid_request" and needle in finals[0]["message"]
        # The client raises the typed error.
        with pytest.raises(InvalidRequest, match="temperature"):
            await ask(kit.url, "q", temperature=5, timeout_s=10)
        # Bad input on the quick path is answered too, and nothing took the intake down.
        await redis.publish(KEYS.ask, "not json either")
        answer = await ask(kit.url, "still there?", timeout_s=10)
        assert answer["answer"] == "it was red"
        await kit.wait_until(lambda: _zero(pending_count(redis)))
        assert len(engine.tickets) == 1 and intake.counters["invalid"] == 9


async def test_busy_engine_quick_path_gets_busy_durable_waits(kit: Any) -> None:
    async with kit.client() as redis, kit.serve(busy=True) as (intake, engine):
        with pytest.raises(Busy, match="queue full"):
            await ask(kit.url, "q", request_id="b1", durable=False, timeout_s=10)
        # A durable request is never answered busy: it waits for room within its deadline.
        durable = asyncio.get_running_loop().create_task(
            ask(kit.url, "q", request_id="d1", timeout_s=10)
        )
        await asyncio.sleep(0.5)
        assert not durable.done() and await pending_count(redis) == 1
        engine.busy = False
        assert (await durable)["answer"] == "it was red"
        answer = await ask(kit.url, "q", request_id="b1", durable=False, timeout_s=10)  # retry
        assert answer["answer"] == "it was red" and len(engine.tickets) == 2
        await kit.wait_until(lambda: _zero(pending_count(redis)))
        assert intake.counters["busy"] == 1


async def test_expired_entry_gets_timeout(kit: Any) -> None:
    async with kit.client() as redis:
        # An entry XADDed (by its id) long ago, e.g. while no daemon ran for days.
        await redis.xadd(KEYS.requests, {"request": request_json("stale")}, id="1000-0")
        async with kit.serve() as (_intake, engine):
            await kit.wait_until(lambda: redis.exists(KEYS.answer("stale")))
        event = json.loads(await redis.get(KEYS.answer("stale")))
        assert event["code"] == "timeout" and engine.tickets == []


async def test_quick_path_and_cancel(kit: Any) -> None:
    async with kit.serve() as (intake, engine):
        answer = await ask(kit.url, "quick?", durable=False, timeout_s=10)
        assert answer["answer"] == "it was red" and engine.tickets[0].entry_id is None
        assert await send_cancel(kit.url, "q-42") == 1
        await kit.wait_until(lambda: engine.cancelled == ["q-42"])
        async with kit.client() as redis:
            await redis.publish(KEYS.cancel, "not a valid id !")
        await asyncio.sleep(0.2)
        assert engine.cancelled == ["q-42"] and intake.counters["cancels"] == 1


async def test_client_errors_without_a_daemon(kit: Any) -> None:
    with pytest.raises(BusError, match="no daemon"):
        await ask(kit.url, "anyone?", durable=False, timeout_s=5)
    with pytest.raises(QueryTimeout):
        await ask(kit.url, "anyone?", timeout_s=0.5)
    with pytest.raises(BusError):
        await ask("redis://127.0.0.1:1/0", "q", timeout_s=5)


async def test_intake_rides_out_a_redis_restart(kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sinks")
    async with kit.serve() as (intake, engine):
        assert (await ask(kit.url, "before", timeout_s=10))["answer"] == "it was red"
        kit.server.stop()
        await kit.wait_until(lambda: not intake.connected)
        await asyncio.sleep(0.3)  # a few failed reconnects
        kit.server.start()
        await kit.wait_until(lambda: intake.connected)
        answer = await ask(kit.url, "after", timeout_s=10)
        assert answer["answer"] == "it was red" and len(engine.tickets) == 2
        # The channels were re-subscribed too.
        assert (await ask(kit.url, "quick", durable=False, timeout_s=10))["type"] == "final"
        assert await send_cancel(kit.url, "q-after") == 1
        await kit.wait_until(lambda: engine.cancelled == ["q-after"])
        assert intake.counters["reconnects"] >= 1
    assert "unavailable" in caplog.text


async def test_final_store_retries_across_an_outage_and_gives_up_loudly(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    redis_settings = kit.redis_settings(kit.url)
    request = QueryRequest(id="r1", question="q")
    ticket = QueryTicket(request=request, entry_id=None, received_at=0.0)
    answer = Answer(id="r1", stream=["cam1"], question="q", answer="late", latency_s=1, model="m")

    # Redis comes back within the store deadline: the answer is stored.
    query = kit.query_settings(final_store_deadline_s=10)
    async with ReplyPublisher(redis_settings, query) as replies:
        kit.server.stop()
        await replies.token("r1", 0, "x")  # best effort: no raise, no wait
        assert replies.tokens_dropped == 1
        restart = asyncio.get_running_loop().call_later(0.3, kit.server.start)
        await replies.finish(ticket, answer)
        restart.cancel()
        assert replies.finals_stored == 1 and replies.finals_unstored == 0
        async with kit.client() as redis:
            assert json.loads(await redis.get(KEYS.answer("r1")))["answer"] == "late"

    # It does not: finish reports it, and the event is in the log (never silently lost).
    query = kit.query_settings(final_store_deadline_s=0.3)
    async with ReplyPublisher(redis_settings, query) as replies:
        kit.server.stop()
        with caplog.at_level(logging.ERROR, logger="sinks.replies"):
            await replies.finish(ticket, answer)
        assert replies.finals_unstored == 1 and replies.finals_stored == 0
        assert '"answer": "late"' in caplog.text
        kit.server.start()


async def test_logs_never_show_the_redis_password(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sinks")
    url = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1
    from sinks.intake import QueryIntake

    redis_settings = kit.redis_settings(url)
    engine = kit.FakeEngine(None)
    intake = QueryIntake(
        redis_settings, kit.query_settings(), submit=engine.submit, cancel=engine.cancel
    )
    task = asyncio.get_running_loop().create_task(intake.run())
    await kit.wait_until(lambda: "unavailable" in caplog.text)
    assert not intake.connected and not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert "hunter2" not in caplog.text and "//***@127.0.0.1:1" in caplog.text


async def test_client_reads_the_stored_answer_when_the_publish_was_missed(kit: Any) -> None:
    """No daemon answers on the channel; the final appears only at answer:<id>."""
    stored = {"type": "final", "id": "missed", "answer": "from the key"}
    asking = asyncio.get_running_loop().create_task(
        ask(kit.url, "q", request_id="missed", timeout_s=10)
    )
    await asyncio.sleep(0.2)
    async with kit.client() as redis:
        await redis.set(KEYS.answer("missed"), json.dumps(stored), ex=60)
    assert await asyncio.wait_for(asking, 10) == stored


async def test_restarted_consumer_drains_its_own_pending_entries_first(kit: Any) -> None:
    """Same consumer name after a crash: its un-acked entry is served at start, not after
    claim_idle_s (60 s here, far beyond the test's waits)."""
    async with kit.client() as redis:
        await redis.xgroup_create(KEYS.requests, GROUP, id="0", mkstream=True)
        await redis.xadd(KEYS.requests, {"request": request_json("mine")})
        await redis.xreadgroup(GROUP, "daemon-1", {KEYS.requests: ">"}, count=10)  # then "crash"
        query = kit.query_settings(consumer_name="daemon-1", claim_idle_s=60)
        async with kit.serve(query=query) as (intake, engine):
            await kit.wait_until(lambda: redis.exists(KEYS.answer("mine")))
            await kit.wait_until(lambda: _zero(pending_count(redis)))
        assert [t.request.id for t in engine.tickets] == ["mine"]
        assert intake.counters["claimed"] == 0


async def test_a_cancel_swallowed_by_a_read_still_stops_the_loop() -> None:
    # redis-py 8 can return from a blocking read as if its task had not been cancelled.
    async def read_loop() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):  # the read that swallows it
                await asyncio.sleep(30)
            raise_if_cancelled()

    task = asyncio.get_running_loop().create_task(read_loop())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10.0)


async def test_the_intake_stops_at_once_after_each_of_many_requests(kit: Any) -> None:
    # Each stop lands while the intake blocks in XREADGROUP; none may be lost.
    for round_index in range(6):
        async with kit.serve() as (_intake, engine):
            answer = await ask(kit.url, "q", request_id=f"stop-{round_index}", timeout_s=10)
            assert answer["type"] == "final" and len(engine.tickets) == 1
