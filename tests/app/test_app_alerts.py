"""The alert manager on a real redis-server, with a scripted scorer and an in-memory sink:
edges become events, state persists before delivery, a restart neither loses nor repeats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis_harness import free_port

from memory.evidence import EvidenceFrame
from sinks.alerts.settings import WebhookSettings
from sinks.alerts.webhook import WebhookSink
from sinks.schema import AlertsStatus, DaemonStatus
from sinks.settings import Keys
from streamer.app.alerts import AlertManager
from streamer.app.alerts_admin import AlertAdmin
from streamer.app.alerts_settings import AlertSettings
from streamer.engine.errors import InvalidRequest
from streamer.engine.standing.errors import ConfigRule, RuleExists, UnknownRule
from streamer.engine.standing.events import AlertEvent
from streamer.engine.standing.rules import ConditionRule, SummaryRule
from streamer.engine.types import Answer, Query, ScoreRequest, Scores
from tests.sinks.test_sinks_status import make_status, render_text

KEYS = Keys("fwtest")


@dataclass
class Scripted:
    """Stands in for the engine: scores from a script (per question), a fixed answer text."""

    script: dict[str, list[float]]
    rounds: list[ScoreRequest] = field(default_factory=list)
    asked: list[Query] = field(default_factory=list)

    async def score(self, request: ScoreRequest) -> Scores:
        self.rounds.append(request)
        values = tuple(self.script[q].pop(0) if self.script[q] else 0.0 for q in request.questions)
        assert request.since is not None and request.until is not None
        return Scores(values, (request.since, request.until), 4, True, 0.01)

    async def generate(self, query: Query) -> Answer:
        self.asked.append(query)
        window = (query.since or 0.0, query.until or 0.0)
        text = f"seen: {query.question}"
        return Answer(query.id, query.stream, query.question, text, (), (), 4, window, (),
                      0.1, 0.05, 3, "tiny")  # fmt: skip


@dataclass
class Sink:
    name: str = "memory"
    events: list[AlertEvent] = field(default_factory=list)
    accept: bool = True
    hold: bool = False  # keep offered events undelivered (a receiver that is away)
    held: set[str] = field(default_factory=set)

    def offer(self, event: AlertEvent) -> bool:
        if self.accept:
            self.events.append(event)
            if self.hold:
                self.held.add(event.alert_id)
        return self.accept

    def unsettled(self) -> set[str]:
        return set(self.held)

    async def run(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "delivered": len(self.events)}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server)
    yield client
    await client.aclose()


def door(**kw: Any) -> ConditionRule:
    fields = {"name": "door", "streams": ["cam"], "question": "Person?", "threshold": 0.6,
              "clear_threshold": 0.3, "cooldown_s": 0, "hits_to_fire": 2, **kw}  # fmt: skip
    return ConditionRule.model_validate(fields)


def manager(client: aioredis.Redis, engine: Scripted, sink: Sink, clock: Clock,
            end: dict[str, float], rules: list[Any] | None = None,
            more: tuple[Sink, ...] = ()) -> AlertManager:  # fmt: skip
    def frames(stream: str, start: float, stop: float, limit: int) -> list[EvidenceFrame]:
        return [EvidenceFrame(stream, start, stop, f"/frames/{stream}/{start:.0f}.jpg")][:limit]

    settings = AlertSettings(rules=rules or [])
    return AlertManager(settings, engine, end.get, [sink, *more], client, KEYS, frames=frames,
                        clock=clock)  # fmt: skip


async def test_edges_fire_once_and_survive_a_restart(client: aioredis.Redis) -> None:
    engine = Scripted({"Person?": [0.7, 0.8, 0.9, 0.1, 0.2]})
    sink, clock, end = Sink(), Clock(), {"cam": 100.0}
    first = manager(client, engine, sink, clock, end, [door()])
    await first.start()
    await first.tick()  # hit
    for _ in range(2):  # a new clip each tick: hit (fires), hit
        end["cam"] += 2.0
        clock.now += 2.0
        await first.tick()
    await first.tick()  # no new clip: not evaluated
    assert len(engine.rounds) == 3
    assert [e.alert_id for e in sink.events] == ["door:1"]
    fired = sink.events[0]
    assert fired.state == "fired" and fired.score == 0.8 and fired.text.startswith("seen:")
    assert fired.frames[0].path.startswith("/frames/cam/") and fired.window == (86.0, 102.0)
    assert engine.asked[0].since == 86.0  # the explanation reads the window that fired
    state = json.loads(await client.hget(KEYS.alerts_state, "door"))
    assert state["seq"] == 1 and state["firing"] and state["pending"] is None
    # restart: the state is back, the next edge continues the sequence
    second = manager(client, engine, sink, clock, end, [door()])
    await second.start()
    end["cam"] += 2.0
    await second.tick()
    assert [e.alert_id for e in sink.events] == ["door:1", "door:2"]
    assert sink.events[1].state == "cleared"
    status = second.status()["rules"][0]
    assert status["state"] == "clear" and status["last_score"] == 0.1 and status["seq"] == 2


async def test_an_event_refused_is_pending_and_offered_again_after_a_restart(
    client: aioredis.Redis,
) -> None:
    engine = Scripted({"Person?": [0.9, 0.9]})
    refusing, clock, end = Sink(accept=False), Clock(), {"cam": 50.0}
    first = manager(client, engine, refusing, clock, end, [door(hits_to_fire=1)])
    await first.start()
    await first.tick()
    state = json.loads(await client.hget(KEYS.alerts_state, "door"))
    assert state["seq"] == 1 and json.loads(state["pending"])["alert_id"] == "door:1"
    # the daemon stops here; the next start re-offers the same event, once
    sink = Sink()
    second = manager(client, engine, sink, clock, end, [door(hits_to_fire=1)])
    await second.start()
    await second.tick()
    await second.tick()
    assert [e.alert_id for e in sink.events] == ["door:1"]
    assert sink.events[0].score == 0.9
    assert len(engine.rounds) == 2  # the edge was not decided again: one round per start


async def test_rounds_share_a_window_and_summaries_run_on_schedule(
    client: aioredis.Redis,
) -> None:
    engine = Scripted({"Person?": [0.1], "Car?": [0.1], "Dog?": [0.1]})
    rules = [door(), door(name="car", question="Car?"), door(name="dog", question="Dog?",
             window_s=4), SummaryRule(name="recap", streams=["cam"], every_minutes=1)]  # fmt: skip
    sink, clock, end = Sink(), Clock(), {"cam": 100.0}
    alerts = manager(client, engine, sink, clock, end, rules)
    await alerts.start()
    await alerts.tick()
    assert sorted(r.questions for r in engine.rounds) == [("Dog?",), ("Person?", "Car?")]
    assert sink.events == []  # the summary is not due yet
    clock.now += 61.0
    await alerts.tick()
    assert [(e.alert_id, e.state) for e in sink.events] == [("recap:1", "summary")]
    assert sink.events[0].text == "seen: Summarise what happened."
    end["cam"] = 130.0
    clock.now += 60.0
    await alerts.tick()
    assert engine.asked[-1].since == 100.0 and engine.asked[-1].until == 130.0  # since last run
    assert [e.alert_id for e in sink.events][-1] == "recap:2"


async def test_runtime_rules_persist_and_admin_errors_are_typed(client: aioredis.Redis) -> None:
    engine = Scripted({"Cat?": [0.42, 0.42]})
    sink, clock, end = Sink(), Clock(), {"cam": 10.0}
    alerts = manager(client, engine, sink, clock, end, [door()])
    await alerts.start()
    cat = door(name="cat", question="Cat?")
    await alerts.add(cat)
    with pytest.raises(RuleExists):
        await alerts.add(cat)
    with pytest.raises(ConfigRule):
        await alerts.remove("door")
    with pytest.raises(UnknownRule):
        await alerts.remove("nobody")
    tested = await alerts.test("cat")
    assert tested["score"] == 0.42 and not tested["would_hit"]
    assert json.loads(await client.hget(KEYS.alerts_state, "cat"))["seq"] == 0  # no firing
    again = manager(client, engine, sink, clock, end, [door()])
    await again.start()
    assert {r["rule"]["name"] for r in again.describe()} == {"door", "cat"}
    await again.remove("cat")
    assert await client.hget(KEYS.alerts_rules, "cat") is None
    with pytest.raises(ConfigRule):
        await again.add(SummaryRule(name="door", streams=["cam"], every_minutes=1))
    await again.add(SummaryRule(name="recap", streams=["cam"], every_minutes=1))
    with pytest.raises(InvalidRequest):
        await again.test("recap")  # a summary has no score


async def test_admin_over_redis_replies_on_the_request_channel(client: aioredis.Redis) -> None:
    engine = Scripted({"Cat?": [0.5]})
    alerts = manager(client, engine, Sink(), Clock(), {"cam": 10.0}, [])
    await alerts.start()
    admin = AlertAdmin(alerts, client, KEYS)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(*(KEYS.reply(f"r{i}") for i in range(1, 5)))
    rule = {"kind": "condition", "name": "cat", "streams": ["cam"], "question": "Cat?"}
    await admin.handle_admin(json.dumps({"id": "r1", "op": "add", "rule": rule}))
    await admin.handle_admin(json.dumps({"id": "r2", "op": "add", "rule": {**rule, "x": 1}}))
    await admin.handle_admin(json.dumps({"id": "r3", "op": "test", "name": "cat"}))
    await admin.handle_admin(json.dumps({"id": "r4", "op": "explode"}))
    await admin.handle_admin(b"\xff not json")  # no id to answer: only logged
    replies = {}
    async with asyncio.timeout(30):
        while len(replies) < 4:
            message = await pubsub.get_message(timeout=1.0)  # None: a subscribe confirmation
            if message is not None:
                event = json.loads(message["data"])
                replies[event["id"]] = event
    await pubsub.aclose()
    assert replies["r1"]["type"] == "final" and replies["r1"]["added"] == "cat"
    assert replies["r2"]["type"] == "error" and replies["r2"]["code"] == "invalid_request"
    assert replies["r3"]["test"]["score"] == 0.5
    assert replies["r4"]["code"] == "invalid_request" and "op" in replies["r4"]["message"]
    assert json.loads(await client.get(KEYS.answer("r3")))["type"] == "final"


async def test_status_reads_in_the_snapshot_and_the_live_view(client: aioredis.Redis) -> None:
    engine = Scripted({"Person?": [0.9]})
    alerts = manager(client, engine, Sink(), Clock(), {"cam": 40.0}, [door(hits_to_fire=1)])
    await alerts.start()
    await alerts.tick()
    status = make_status().model_copy(update={"alerts": AlertsStatus.model_validate(
        alerts.status())})  # fmt: skip
    snapshot = DaemonStatus.model_validate_json(status.model_dump_json())
    assert snapshot.alerts is not None and snapshot.alerts.rules[0].state == "firing"
    assert snapshot.alerts.sinks[0]["delivered"] == 1
    text = render_text(snapshot)
    assert "door firing 0.90" in text and "eval lag" in text


async def test_a_full_or_closed_sink_drops_counted_and_only_it_is_offered_again(
    client: aioredis.Redis,
) -> None:
    # A webhook whose receiver is not there (and whose delivery task never runs): its queue of
    # two fills up, then it is closed as at shutdown and refuses; the other sink is unaffected.
    url = f"http://127.0.0.1:{free_port()}/hook"
    hook = WebhookSink(WebhookSettings(url=url, secret="k" * 16), name="down", queue_size=2)
    memory, clock, end = Sink(), Clock(), {"cam": 60.0}
    names = ("door", "car", "dog")
    engine = Scripted({f"{n}?": [0.9, 0.1] for n in names})
    rules = [door(name=n, question=f"{n}?", hits_to_fire=1) for n in names]
    alerts = AlertManager(AlertSettings(rules=rules), engine, end.get, [memory, hook], client,
                          KEYS, clock=clock)  # fmt: skip
    await alerts.start()
    await alerts.tick()  # three alerts fire: the webhook keeps the newest two
    webhook = alerts.status()["sinks"][1]
    assert webhook["channel"] == "webhook:down" and webhook["target"] == url.removesuffix("/hook")
    assert (webhook["offered"], webhook["queued"], webhook["dropped"]) == (3, 2, 1)
    await alerts.aclose()  # as the daemon's shutdown does: what was queued is dropped
    webhook = alerts.status()["sinks"][1]
    assert (webhook["queued"], webhook["dropped"]) == (0, 3)
    end["cam"] += 2.0
    clock.now += 2.0
    await alerts.tick()  # they clear: the closed webhook refuses, the events stay pending
    await alerts.tick()  # offered again, to the webhook only
    assert [e.alert_id for e in memory.events] == [f"{n}:{i}" for i in (1, 2) for n in names]
    assert all(rule["pending"] for rule in alerts.status()["rules"])
    assert alerts.status()["sinks"][1]["dropped"] == 3 + 2 * 3
    status = make_status().model_copy(update={"alerts": AlertsStatus.model_validate(
        alerts.status())})  # fmt: skip
    snapshot = DaemonStatus.model_validate_json(status.model_dump_json())
    assert snapshot.alerts is not None and snapshot.alerts.sinks[1]["dropped"] == 9


async def test_what_a_channel_still_held_at_a_stop_is_offered_to_it_again(
    client: aioredis.Redis,
) -> None:
    engine = Scripted({"Person?": [0.9, 0.9]})
    quick, slow = Sink("quick"), Sink("slow", hold=True)  # slow: its receiver is away
    clock, end = Clock(), {"cam": 100.0}
    first = manager(client, engine, quick, clock, end, [door()], more=(slow,))
    await first.start()
    for _ in range(2):
        end["cam"] += 2.0
        await first.tick()
    assert [e.alert_id for e in quick.events] == ["door:1"] == [e.alert_id for e in slow.events]
    await first.tick()  # quick delivered: settled there; slow still holds it
    owed = json.loads(await client.hget(KEYS.alerts_outbox, "door:1"))
    assert owed["owed"] == ["slow"]
    await first.aclose()  # a stop: slow's queue is lost with the process

    quick2, slow2 = Sink("quick"), Sink("slow")
    second = manager(client, engine, quick2, clock, end, [door()], more=(slow2,))
    await second.start()
    assert [e.alert_id for e in slow2.events] == ["door:1"]  # the same id, to slow only
    assert quick2.events == []
    await second.tick()
    assert await client.hget(KEYS.alerts_outbox, "door:1") is None  # delivered: settled
    assert [e.alert_id for e in slow2.events].count("door:1") == 1
