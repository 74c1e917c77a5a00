"""The request stream is the queue, and no input wedges it (issue 9), on a real redis-server.

Each test reproduces a defect of the old intake: a burst answered ``busy``, a busy id answered
twice, poison entries that were never acked and blocked every later request, a 0xff byte on the
cancel channel that dropped the subscription.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import redis.asyncio as aioredis

from sinks import ask
from sinks.client import cancel as send_cancel
from sinks.schema import DaemonStatus, QueryStats
from sinks.settings import Keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
KEYS = Keys("flashwatch")
GROUP = "flashwatch"


def request_json(request_id: str, question: str = "what colour?", **fields: Any) -> str:
    return json.dumps({"id": request_id, "stream": "cam1", "question": question, **fields})


def raw_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=False)


async def pending_count(redis: Any) -> int:
    info = await redis.xpending(KEYS.requests, GROUP)
    return int(info["pending"])


class FinalCounter:
    """Counts final/error events per request id on every reply channel (PSUBSCRIBE)."""

    def __init__(self, redis: Any) -> None:
        self.events: dict[str, list[dict[str, Any]]] = {}
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FinalCounter:
        await self._pubsub.psubscribe(KEYS.reply("*"))
        self._task = asyncio.get_running_loop().create_task(self._collect())
        return self

    async def _collect(self) -> None:
        while True:
            message = await self._pubsub.get_message(timeout=0.1)
            if message:
                event = json.loads(message["data"])
                if event["type"] in ("final", "error"):
                    self.events.setdefault(event["id"], []).append(event)

    def total(self) -> int:
        return sum(len(events) for events in self.events.values())

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._pubsub.aclose()


async def test_a_burst_of_500_durable_requests_is_answered_once_each(kit: Any) -> None:
    """Old intake: 35 answered, 465 busy. The engine holds 16; the rest wait in the stream."""
    count = 500
    async with kit.client() as redis, FinalCounter(redis) as finals:
        async with kit.serve(max_queued=16, delay_s=0.01) as (intake, engine):
            async with redis.pipeline(transaction=False) as pipe:
                for index in range(count):
                    pipe.xadd(KEYS.requests, {"request": request_json(f"burst-{index}")})
                await pipe.execute()
            await kit.wait_until(lambda: finals.total() >= count, timeout_s=90)
            await kit.wait_until(lambda: _is_zero(pending_count(redis)))
            await asyncio.sleep(0.3)  # nothing more arrives late
        assert engine.refused == 0, "the intake read more than the engine had room for"
        assert finals.total() == count and len(finals.events) == count
        assert {events[0]["type"] for events in finals.events.values()} == {"final"}
        assert sorted(t.request.id for t in engine.tickets) == sorted(
            f"burst-{index}" for index in range(count)
        )
        assert intake.counters["busy"] == 0


async def test_requests_still_waiting_at_their_deadline_get_timeout(kit: Any) -> None:
    """The stream is the queue, not a place to be forgotten: a request still waiting for room
    when its own deadline (counted from its XADD) passes gets ``timeout``."""
    async with kit.client() as redis, FinalCounter(redis) as finals:
        async with kit.serve(max_queued=1, delay_s=1.5) as (intake, engine):
            for index in range(3):
                body = request_json(f"slow-{index}", deadline_s=0.5)
                await redis.xadd(KEYS.requests, {"request": body})
            await kit.wait_until(lambda: finals.total() == 3)
            await kit.wait_until(lambda: _is_zero(pending_count(redis)))
        codes = {rid: events[0].get("code", "final") for rid, events in finals.events.items()}
        assert codes == {"slow-0": "final", "slow-1": "timeout", "slow-2": "timeout"}
        assert [t.request.id for t in engine.tickets] == ["slow-0"]
        assert intake.counters["busy"] == 0 and engine.refused == 0


async def test_quick_path_keeps_busy_past_the_bound(kit: Any) -> None:
    async with kit.serve(max_queued=1, delay_s=1.0) as (intake, engine):
        first = asyncio.get_running_loop().create_task(
            ask(kit.url, "q", durable=False, request_id="quick-1", timeout_s=10)
        )
        await kit.wait_until(lambda: engine.tickets)
        from streamer.engine.errors import Busy

        with pytest.raises(Busy):
            await ask(kit.url, "q", durable=False, request_id="quick-2", timeout_s=10)
        assert (await first)["type"] == "final"
        assert intake.counters["busy"] == 1


async def test_a_busy_id_retried_twice_is_answered_once(kit: Any) -> None:
    """A stored busy event (quick path, or an old daemon) must not let two retries both run."""
    async with kit.client() as redis, FinalCounter(redis) as finals:
        busy = {"type": "error", "v": 1, "id": "retry", "code": "busy", "message": "full"}
        await redis.set(KEYS.answer("retry"), json.dumps(busy), ex=60)
        async with kit.serve(delay_s=0.5) as (intake, engine):
            await redis.xadd(KEYS.requests, {"request": request_json("retry")})
            await redis.xadd(KEYS.requests, {"request": request_json("retry")})
            await kit.wait_until(lambda: finals.total() >= 1)
            await kit.wait_until(lambda: _is_zero(pending_count(redis)))
            await asyncio.sleep(0.8)  # a second answer would arrive within the fake's delay
        assert [t.request.id for t in engine.tickets] == ["retry"]
        assert [e["type"] for e in finals.events["retry"]] == ["final"]
        assert json.loads(await redis.get(KEYS.answer("retry")))["type"] == "final"
        assert intake.counters["duplicate"] == 1


def _poison_entries() -> list[tuple[str, dict[bytes, bytes]]]:
    """(request id the reply goes to, raw entry fields), one per way the old intake wedged."""

    def body(request_id: str, tail: bytes) -> bytes:
        return b'{"id": "' + request_id.encode() + b'", "question": "q", ' + tail + b"}"

    return [
        # RecursionError in json.loads
        ("deep", {b"request": body("deep", b'"stream": ' + b"[" * 3000 + b"]" * 3000)}),
        # OverflowError in float(): a 400-digit integer
        ("huge-int", {b"request": body("huge-int", b'"since": 1' + b"0" * 400)}),
        ("huge-float", {b"request": body("huge-float", b'"since": 1e400')}),
        ("nan", {b"request": body("nan", b'"since": NaN')}),
        # UnicodeDecodeError inside redis-py (decode_responses=True): in a value ...
        ("bad-byte", {b"request": body("bad-byte", b'"until": "\xff"')}),
        # ... and in a field name
        ("bad-name", {b"request": body("bad-name", b'"max_new_tokens": 4'), b"\xff": b"x"}),
    ]


async def test_poison_entries_are_answered_invalid_and_the_next_request_is_served(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sinks")
    poison = _poison_entries()
    async with kit.client() as redis, raw_client(kit.url) as raw:
        async with kit.serve() as (intake, engine):
            for _request_id, fields in poison:
                await raw.xadd(KEYS.requests, fields)  # type: ignore[arg-type]
            answer = await ask(kit.url, "still there?", request_id="after-poison", timeout_s=20)
            assert answer["type"] == "final"
            for request_id, _fields in poison:
                await kit.wait_until(lambda r=request_id: redis.exists(KEYS.answer(r)))
                event = json.loads(await redis.get(KEYS.answer(request_id)))
                assert event["code"] == "invalid_request", (request_id, event)
                assert "\n" not in event["message"] and len(event["message"]) <= 300
            await kit.wait_until(lambda: _is_zero(pending_count(redis)))
        assert [t.request.id for t in engine.tickets] == ["after-poison"]
        assert intake.counters["invalid"] == len(poison)
    assert "Traceback" not in caplog.text and not [
        r for r in caplog.records if r.levelno >= logging.ERROR
    ]


async def test_error_text_sent_to_clients_is_one_line(kit: Any) -> None:
    async with kit.client() as redis, kit.serve():
        await redis.xadd(
            KEYS.requests, {"request": json.dumps({"id": "ml", "question": "q", "a\nb\rc": 1})}
        )
        await kit.wait_until(lambda: redis.exists(KEYS.answer("ml")))
        event = json.loads(await redis.get(KEYS.answer("ml")))
        assert event["code"] == "invalid_request" and "unknown field" in event["message"]
        assert not any(ch in event["message"] for ch in "\n\r")


async def test_poison_on_the_channels_does_not_disturb_the_quick_path(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Old intake: 0xff on flashwatch:cancel raised inside redis-py and the subscription
    flapped (dropped, re-subscribed, messages lost)."""
    caplog.set_level(logging.WARNING, logger="sinks")
    async with raw_client(kit.url) as raw, kit.serve() as (intake, engine):
        flaps: list[bool] = []
        watcher = asyncio.get_running_loop().create_task(_watch(intake, flaps))
        for channel in (KEYS.cancel, KEYS.ask, KEYS.forget):
            await raw.publish(channel, b"\xff")
        await raw.publish(KEYS.ask, b'{"id": "q-bad", "question": "\xff"}')
        await raw.publish(KEYS.ask, b"[" * 5000)
        answer = await ask(kit.url, "quick?", durable=False, request_id="q-ok", timeout_s=10)
        assert answer["type"] == "final"
        assert await send_cancel(kit.url, "q-99") == 1
        await kit.wait_until(lambda: engine.cancelled == ["q-99"])
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        async with kit.client() as redis:
            bad = json.loads(await redis.get(KEYS.answer("q-bad")))
        assert bad["code"] == "invalid_request"
        assert flaps == [], "the subscription went down"
        assert intake.counters["bad_messages"] >= 2 and intake.counters["cancels"] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _watch(intake: Any, flaps: list[bool]) -> None:
    while True:
        if not intake.connected:
            flaps.append(True)
        await asyncio.sleep(0.005)


async def test_an_entry_delivered_too_often_goes_to_the_dead_letter_stream(kit: Any) -> None:
    """An entry whose handling kept failing (a daemon crashing on it) is given up on."""
    async with kit.client() as redis:
        await redis.xgroup_create(KEYS.requests, GROUP, id="0", mkstream=True)
        entry_id = await redis.xadd(KEYS.requests, {"request": request_json("cursed")})
        await redis.xreadgroup(GROUP, "test-b", {KEYS.requests: ">"}, count=10)
        # As if five earlier starts read it and died before answering.
        await redis.xclaim(KEYS.requests, GROUP, "test-b", 0, [entry_id], retrycount=5)
        query = kit.query_settings(max_deliveries=5)
        async with kit.serve(query=query) as (intake, engine):
            await kit.wait_until(lambda: redis.exists(KEYS.answer("cursed")))
            await kit.wait_until(lambda: _is_zero(pending_count(redis)))
            event = json.loads(await redis.get(KEYS.answer("cursed")))
            assert event["code"] == "internal" and "delivered 6 times" in event["message"]
            dead = await redis.xrange(KEYS.requests_dead)
            assert len(dead) == 1
            fields = dead[0][1]
            assert fields["entry"] == entry_id and "max_deliveries 5" in fields["reason"]
            assert json.loads(fields["field:request"])["id"] == "cursed"
            await kit.wait_until(lambda: intake.dead_letters == 1)
            await kit.wait_until(lambda: intake.stream_pending == 0)
            assert intake.stream_waiting == 0
            # The next request is served as usual.
            assert (await ask(kit.url, "and now?", timeout_s=10))["type"] == "final"
        assert [t.request.id for t in engine.tickets] != ["cursed"]
        assert intake.counters["dead_lettered"] == 1


async def test_an_entry_below_the_delivery_cap_is_served(kit: Any) -> None:
    async with kit.client() as redis:
        await redis.xgroup_create(KEYS.requests, GROUP, id="0", mkstream=True)
        entry_id = await redis.xadd(KEYS.requests, {"request": request_json("lucky")})
        await redis.xreadgroup(GROUP, "test-b", {KEYS.requests: ">"}, count=10)
        await redis.xclaim(KEYS.requests, GROUP, "test-b", 0, [entry_id], retrycount=3)
        async with kit.serve(query=kit.query_settings(max_deliveries=5)) as (intake, engine):
            await kit.wait_until(lambda: redis.exists(KEYS.answer("lucky")))
        assert [t.request.id for t in engine.tickets] == ["lucky"]
        assert intake.counters["dead_lettered"] == 0


def test_status_snapshot_carries_the_queue_counts_and_stays_compatible() -> None:
    old = {"pending": 1, "in_flight": 0, "completed": 2, "failed": 0}  # a v1 daemon's snapshot
    assert QueryStats.model_validate(old).dead_letters is None
    new = QueryStats.model_validate({**old, "stream_waiting": 7, "stream_pending": 3,
                                     "dead_letters": 1})  # fmt: skip
    assert (new.stream_waiting, new.stream_pending, new.dead_letters) == (7, 3, 1)
    assert DaemonStatus.model_fields["v"].default == 1


async def _is_zero(count: Any) -> bool:
    return await count == 0


def test_live_view_shows_the_request_backlog_only_when_there_is_one() -> None:
    import io

    from rich.console import Console

    from sinks.schema import DaemonInfo
    from sinks.tui import render_status

    def render(queries: QueryStats) -> str:
        info = DaemonInfo(pid=1, started_at=0.0, uptime_s=1.0, version="0", model="m",
                          device="cpu")  # fmt: skip
        status = DaemonStatus(time=1.0, daemon=info, queries=queries)
        console = Console(file=io.StringIO(), width=100, color_system=None)
        console.print(render_status(status))
        return console.file.getvalue()  # type: ignore[attr-defined]

    assert "request stream" not in render(QueryStats(stream_waiting=0, dead_letters=0))
    text = render(QueryStats(stream_waiting=480, stream_pending=16, dead_letters=2))
    assert "waiting 480" in text and "pending 16" in text and "dead letters 2" in text
