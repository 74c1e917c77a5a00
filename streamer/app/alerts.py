"""The alert manager: runs standing queries against the engine and hands events to the sinks.

Every ``tick_s`` it looks for due work:

- **conditions** due now (a new clip in their window, or ``every_s`` passed) are grouped by
  window (same streams, same ``window_s``): each group is one scoring round of the engine
  (one shared prefill of the window, a suffix per question); each score steps its rule
  (``streamer.engine.standing.rules``); an edge becomes an event, a firing one with a short
  generated explanation (bounded wait) and the window's evidence frames;
- **summaries** whose scheduled time passed run once over the interval since their last run.

Exactly once across restarts: a rule's sequence and edge state live in ``Keys.alerts_state``
and are written, together with the event about to go out (``pending``), BEFORE any sink is
offered the event; ``pending`` is cleared once every sink took it. A restart re-offers a
pending event under the same ``alert_id``; an edge not yet written is decided again with the
same sequence number. Rules added at run time live in ``Keys.alerts_rules``.

At least once across restarts: every event also goes into ``Keys.alerts_outbox`` with the
channels that still owe it, before any channel sees it; a channel settles it by delivering it
or by giving up on it (refused for good, out of attempts, pushed out of its bounded queue), and
the entry goes once all have. What a stopped (or killed) daemon still held in its queues is
offered again at the next start, to those channels only, under the same ``alert_id``.

Administration (``flashwatch alert add|list|rm|test``) is ``add``, ``remove``, ``test`` and
``describe`` here; ``streamer.app.alerts_admin`` serves them over Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from memory.evidence import EvidenceFrame
from model.errors import FlashwatchError
from sinks.connection import REDIS_DOWN_ERRORS, RedisClient
from sinks.schema import one_line
from sinks.settings import Keys
from streamer.app.alerts_admin import AlertAdmin
from streamer.app.alerts_settings import AlertSettings
from streamer.engine.errors import EmptyMemory, InvalidRequest, QueryError
from streamer.engine.standing.errors import ConfigRule, RuleExists, UnknownRule
from streamer.engine.standing.events import AlertEvent, AlertSink, AlertState
from streamer.engine.standing.rules import (
    ConditionRule,
    Rule,
    RuleState,
    SummaryRule,
    condition_due,
    make_event,
    next_summary_at,
    step_condition,
)
from streamer.engine.types import Answer, Query, ScoreRequest, Scores
from streamer.ingest.backoff import Backoff

log = logging.getLogger(__name__)


FrameLookup = Callable[[str, float, float, int], list[EvidenceFrame]]
WindowEnd = Callable[[str], float | None]  # the newest memory end of a stream, stream seconds


class AlertEngine(Protocol):
    """What the manager needs of the engine (``streamer.engine.core.Engine``)."""

    async def score(self, request: ScoreRequest) -> Scores: ...
    async def generate(self, query: Query) -> Answer: ...


class _StoredRule(BaseModel):
    """A run-time rule as kept in ``Keys.alerts_rules``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Rule
    created_at: float


_RECORD = TypeAdapter(_StoredRule)


@dataclass
class _Live:
    """One rule as the manager runs it."""

    rule: ConditionRule | SummaryRule
    source: Literal["config", "runtime"]
    state: RuleState
    created_at: float
    seen_end: float | None = None  # window end at the last evaluation (new clip detection)
    lag_s: float | None = None  # from due to scored, last evaluation
    error: str | None = None
    taken_by: set[int] = field(default_factory=set)  # sinks (indexes) holding the pending event


@dataclass
class _Owed:
    """An event in the outbox: the channels that have not settled it, and which took it."""

    event: AlertEvent
    owed: set[str]
    taken: set[str] = field(default_factory=set)

    def to_json(self) -> str:
        return json.dumps({"event": json.loads(self.event.to_json()), "owed": sorted(self.owed)})


class AlertManager:
    def __init__(
        self,
        settings: AlertSettings,
        engine: AlertEngine,
        window_end: WindowEnd,
        sinks: Sequence[AlertSink],
        client: RedisClient,
        keys: Keys,
        *,
        frames: FrameLookup | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._window_end = window_end
        self._sinks = list(sinks)
        self._client = client
        self._keys = keys
        self._frames = frames
        self._clock = clock
        self._rules: dict[str, _Live] = {}
        self._outbox: dict[str, _Owed] = {}  # alert id -> what is still owed
        self.counters = {"evaluations": 0, "fired": 0, "cleared": 0, "summaries": 0, "errors": 0}

    # ---- start-up ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load run-time rules and every rule's state; re-offer events left pending."""
        now = self._clock()
        stored = await self._client.hgetall(self._keys.alerts_rules)
        states = await self._client.hgetall(self._keys.alerts_state)
        for rule in self._settings.rules:
            self._rules[rule.name] = _Live(rule, "config", RuleState(), now)
        for raw_name, raw in sorted(stored.items()):
            name = _text(raw_name)
            try:
                record = _RECORD.validate_json(raw)
            except ValidationError as exc:
                log.warning("stored alert rule %s ignored: %s", name, one_line(exc))
                continue
            if record.rule.name in self._rules:
                log.warning("stored alert rule %s shadowed by the config's", name)
                continue
            self._rules[name] = _Live(record.rule, "runtime", RuleState(), record.created_at)
        for raw_name, raw in states.items():
            live = self._rules.get(_text(raw_name))
            if live is not None:
                with contextlib.suppress(ValueError, TypeError):
                    live.state = RuleState.from_dict(json.loads(raw))
        await self._load_outbox()
        for live in self._rules.values():
            if live.state.pending is None:
                continue
            if event_from_json(live.state.pending).alert_id in self._outbox:
                live.state = replace(live.state, pending=None)  # the outbox delivers it
                await self._save(live)
            else:
                await self._offer_pending(live)

    async def _load_outbox(self) -> None:
        """Offer what the last run still owed, to the channels that owed it."""
        names = {sink.name for sink in self._sinks}
        for raw_id, raw in (await self._client.hgetall(self._keys.alerts_outbox)).items():
            alert_id = _text(raw_id)
            try:
                data = json.loads(raw)
                event = event_from_json(json.dumps(data["event"]))
                owed = {str(name) for name in data["owed"]} & names
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("alerts: outbox entry %s ignored: %s", alert_id, one_line(exc))
                owed = set()
            if not owed:
                await self._client.hdel(self._keys.alerts_outbox, alert_id)
                continue
            self._outbox[alert_id] = _Owed(event, owed)
            self._offer_owed(self._outbox[alert_id])
        if self._outbox:
            log.info("alerts: %d event(s) owed by the last run offered again", len(self._outbox))

    def _offer_owed(self, entry: _Owed) -> None:
        for sink in self._sinks:
            owes = sink.name in entry.owed and sink.name not in entry.taken
            if owes and sink.offer(entry.event):
                entry.taken.add(sink.name)

    async def _settle(self) -> None:
        """Drop from the outbox what every channel has delivered or given up on."""
        if not self._outbox:
            return
        unsettled = {sink.name: sink.unsettled() for sink in self._sinks}
        for alert_id, entry in list(self._outbox.items()):
            settled = {n for n in entry.taken if alert_id not in unsettled.get(n, set())}
            if not settled:
                continue
            entry.owed -= settled
            entry.taken -= settled
            if entry.owed:
                await self._client.hset(self._keys.alerts_outbox, alert_id, entry.to_json())
            else:
                del self._outbox[alert_id]
                await self._client.hdel(self._keys.alerts_outbox, alert_id)

    # ---- the loop --------------------------------------------------------------------------

    async def serve(self, backoff: Backoff) -> None:
        """The whole manager for the daemon: start (retried while Redis is away), then the
        evaluation loop, the admin channel and every sink's delivery, until cancelled."""
        while True:
            try:
                await self.start()
                break
            except REDIS_DOWN_ERRORS as exc:
                log.warning("alerts: Redis unavailable at start: %s", one_line(exc))
                await asyncio.sleep(backoff.next_delay())
        backoff.reset()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.run())
            group.create_task(AlertAdmin(self, self._client, self._keys).run(backoff))
            for sink in self._sinks:
                group.create_task(sink.run())

    async def run(self) -> None:
        """Evaluate due rules every ``tick_s`` until cancelled; never raises otherwise."""
        while True:
            try:
                await self.tick()
            except REDIS_DOWN_ERRORS as exc:
                self.counters["errors"] += 1
                log.warning("alerts: Redis unavailable: %s", one_line(exc))
            except Exception as exc:  # noqa: BLE001 (a stage boundary: counted, retried)
                self.counters["errors"] += 1
                log.warning("alerts: evaluation failed: %s: %s", type(exc).__name__, one_line(exc))
            await asyncio.sleep(self._settings.tick_s)

    async def tick(self) -> None:
        """One pass: settled deliveries, pending re-offers, due conditions (grouped by window),
        due summaries."""
        await self._settle()
        for live in list(self._rules.values()):
            if live.state.pending is not None:
                await self._offer_pending(live)
        now = self._clock()
        groups: dict[tuple[tuple[str, ...], float], list[_Live]] = {}
        for live in self._rules.values():
            rule = live.rule
            if isinstance(rule, ConditionRule) and live.state.pending is None:
                end = self._end_of(rule.streams)
                if end is None:
                    continue
                fresh = live.seen_end is None or end > live.seen_end
                if condition_due(rule, live.state, now, fresh):
                    groups.setdefault((tuple(rule.streams), rule.window_s), []).append(live)
        for (streams, window_s), members in groups.items():
            await self._evaluate(streams, window_s, members, now)
        for live in list(self._rules.values()):
            if isinstance(live.rule, SummaryRule) and live.state.pending is None:
                due = self._summary_due(live)
                if due <= self._clock():
                    await self._summarise(live, due)

    def _end_of(self, streams: Sequence[str]) -> float | None:
        ends = [e for e in (self._window_end(s) for s in streams) if e is not None]
        return max(ends) if ends else None

    async def _evaluate(
        self, streams: tuple[str, ...], window_s: float, members: list[_Live], due_at: float
    ) -> None:
        end = self._end_of(streams)
        assert end is not None
        request = ScoreRequest(
            tuple(m.rule.question for m in members), streams, since=end - window_s, until=end
        )
        try:
            scores = await asyncio.wait_for(
                self._engine.score(request), self._settings.score_timeout_s
            )
        except (QueryError, TimeoutError) as exc:
            self.counters["errors"] += 1
            for member in members:
                member.error = _describe(exc)
            log.info("alerts: evaluating %s failed: %s", ", ".join(streams), _describe(exc))
            return
        self.counters["evaluations"] += 1
        now = self._clock()
        for member, score in zip(members, scores.values, strict=True):
            member.seen_end, member.lag_s, member.error = end, max(0.0, now - due_at), None
            rule = member.rule
            assert isinstance(rule, ConditionRule)
            state, edge = step_condition(rule, member.state, score, now)
            if edge is None:
                member.state = state
                await self._save(member)
                continue
            text = ""
            if edge.state is AlertState.FIRED and rule.explain:
                text = await self._explain(rule, scores.history, edge.seq)
            event = make_event(
                rule, edge.state, edge.seq, at=now, window=scores.history, text=text, score=score
            )
            event = self._with_frames(event)
            self.counters["fired" if edge.state is AlertState.FIRED else "cleared"] += 1
            await self._emit(member, state, event)

    async def _explain(self, rule: ConditionRule, window: tuple[float, float], seq: int) -> str:
        query = Query(
            id=f"alert-{rule.name}-{seq}",
            question=f"{rule.question} Explain briefly what you see.",
            stream=tuple(rule.streams),
            since=window[0],
            until=window[1],
            max_new_tokens=rule.explain_max_tokens,
            deadline_s=rule.explain_wait_s,
        )
        try:
            answer = await asyncio.wait_for(self._engine.generate(query), rule.explain_wait_s)
        except (QueryError, TimeoutError) as exc:
            log.info("alerts: no explanation for %s: %s", rule.name, _describe(exc))
            return ""
        return answer.text.strip()

    def _summary_due(self, live: _Live) -> float:
        rule = live.rule
        assert isinstance(rule, SummaryRule)
        last = live.state.last_eval if live.state.last_eval is not None else live.created_at
        return next_summary_at(rule, last, self._settings.zone)

    async def _summarise(self, live: _Live, due: float) -> None:
        rule = live.rule
        assert isinstance(rule, SummaryRule)
        end = self._end_of(rule.streams)
        since = live.state.window_end
        seq = live.state.seq + 1
        query = Query(
            id=f"summary-{rule.name}-{seq}",
            question=rule.question,
            stream=tuple(rule.streams),
            since=since,
            until=end,
            max_new_tokens=rule.max_new_tokens,
            deadline_s=rule.wait_s,
        )
        try:
            if end is None:
                raise EmptyMemory("no memory yet for " + ", ".join(rule.streams))
            answer = await asyncio.wait_for(self._engine.generate(query), rule.wait_s)
        except (QueryError, TimeoutError) as exc:  # this run is skipped; the next is scheduled
            self.counters["errors"] += 1
            live.error = _describe(exc)
            live.state = replace(live.state, last_eval=due)
            await self._save(live)
            log.info("alerts: summary %s skipped: %s", rule.name, live.error)
            return
        window = answer.history or (since if since is not None else end, end)
        now = self._clock()
        event = make_event(
            rule, AlertState.SUMMARY, seq, at=now, window=window, text=answer.text.strip()
        )
        live.error, live.lag_s = None, max(0.0, now - due)
        self.counters["summaries"] += 1
        state = replace(live.state, seq=seq, last_eval=due, window_end=end)
        await self._emit(live, state, self._with_frames(event))

    def _with_frames(self, event: AlertEvent) -> AlertEvent:
        limit = self._settings.frames_per_alert
        if self._frames is None or limit == 0:
            return event
        frames: list[EvidenceFrame] = []
        for stream in event.streams:
            try:
                frames.extend(self._frames(stream, event.window[0], event.window[1], limit))
            except (FlashwatchError, OSError) as exc:
                log.info("alerts: no frames of %s: %s", stream, one_line(exc))
        return replace(event, frames=tuple(frames))

    # ---- delivery: state first, then the sinks --------------------------------------------

    async def _emit(self, live: _Live, state: RuleState, event: AlertEvent) -> None:
        owed = _Owed(event, {sink.name for sink in self._sinks})
        await self._client.hset(self._keys.alerts_outbox, event.alert_id, owed.to_json())
        self._outbox[event.alert_id] = owed
        live.state = replace(state, pending=event.to_json())
        live.taken_by.clear()
        await self._save(live)  # before any sink sees it: a restart re-offers the same id
        await self._offer_pending(live)

    async def _offer_pending(self, live: _Live) -> None:
        """Offer the pending event to every sink that has not taken it yet (a refusal is
        offered again next tick, to that sink only); clear it once all have."""
        pending = live.state.pending
        assert pending is not None
        event = event_from_json(pending)
        owed = self._outbox.get(event.alert_id)
        for index, sink in enumerate(self._sinks):
            if index in live.taken_by:
                continue
            if owed is not None and (sink.name in owed.taken or sink.name not in owed.owed):
                live.taken_by.add(index)  # the outbox gave it to this channel already
            elif sink.offer(event):
                live.taken_by.add(index)
                if owed is not None:
                    owed.taken.add(sink.name)
        if len(live.taken_by) == len(self._sinks):
            live.taken_by.clear()
            live.state = replace(live.state, pending=None)
            await self._save(live)
        else:
            refused = [s.name for i, s in enumerate(self._sinks) if i not in live.taken_by]
            log.info("alerts: %s refused by %s; offered again next tick", event.alert_id,
                     ", ".join(refused))  # fmt: skip

    async def aclose(self) -> None:
        """Close every sink (after ``serve`` was cancelled): each counts what it still held
        as dropped. A pending event stays in the state, offered again at the next start."""
        for sink in self._sinks:
            try:
                await sink.aclose()
            except REDIS_DOWN_ERRORS as exc:  # a Redis sink closing its own client
                log.warning("alerts: closing %s: %s", sink.name, one_line(exc))

    async def _save(self, live: _Live) -> None:
        await self._client.hset(
            self._keys.alerts_state, live.rule.name, json.dumps(live.state.as_dict())
        )

    # ---- administration --------------------------------------------------------------------

    async def add(self, rule: ConditionRule | SummaryRule, *, replace_rule: bool = False) -> None:
        existing = self._rules.get(rule.name)
        if existing is not None:
            if existing.source == "config":
                raise ConfigRule(f"rule {rule.name} comes from the config file; change it there")
            if not replace_rule:
                raise RuleExists(f"rule {rule.name} exists; add it with replace to change it")
        elif len(self._rules) >= self._settings.max_rules:
            raise InvalidRequest(f"at most {self._settings.max_rules} rules")
        now = self._clock()
        record = _StoredRule(rule=rule, created_at=now)
        await self._client.hset(self._keys.alerts_rules, rule.name, record.model_dump_json())
        state = existing.state if existing is not None else RuleState()
        self._rules[rule.name] = _Live(rule, "runtime", state, now)
        await self._save(self._rules[rule.name])

    async def remove(self, name: str) -> None:
        live = self._rules.get(name)
        if live is None:
            raise UnknownRule(f"no rule named {name}")
        if live.source == "config":
            raise ConfigRule(f"rule {name} comes from the config file; remove it there")
        await self._client.hdel(self._keys.alerts_rules, name)
        # the state stays: a rule added again under this name goes on with its sequence
        del self._rules[name]

    async def test(self, name: str | None, rule: ConditionRule | None = None) -> dict[str, Any]:
        """The current score of a condition (by name, or an unsaved one), without firing."""
        if rule is None:
            live = self._rules.get(name or "")
            if live is None:
                raise UnknownRule(f"no rule named {name}")
            if not isinstance(live.rule, ConditionRule):
                raise InvalidRequest(f"rule {name} is a summary: only conditions have a score")
            rule = live.rule
        end = self._end_of(rule.streams)
        if end is None:
            raise EmptyMemory("no memory yet for " + ", ".join(rule.streams))
        request = ScoreRequest(
            (rule.question,), tuple(rule.streams), since=end - rule.window_s, until=end
        )
        scores = await asyncio.wait_for(self._engine.score(request), self._settings.score_timeout_s)
        score = scores.values[0]
        return {
            "name": rule.name,
            "score": score,
            "threshold": rule.threshold,
            "would_hit": score >= rule.threshold,
            "window": list(scores.history),
        }

    def describe(self) -> list[dict[str, Any]]:
        """Every rule with its settings, source and status (``alert list``)."""
        return [
            {"rule": live.rule.model_dump(mode="json"), "source": live.source, **self._status(live)}
            for live in self._rules.values()
        ]

    def status(self) -> dict[str, Any]:
        """JSON-ready status: per rule, then the sinks' counters."""
        return {
            "rules": [{"name": n, **self._status(live)} for n, live in self._rules.items()],
            "counters": dict(self.counters),
            "sinks": [sink.stats() for sink in self._sinks],
        }

    def _status(self, live: _Live) -> dict[str, Any]:
        state = live.state
        if isinstance(live.rule, SummaryRule):
            shown, next_at = "scheduled", self._summary_due(live)
        else:
            shown, next_at = ("firing" if state.firing else "clear"), None
        return {
            "kind": live.rule.kind,
            "state": shown,
            "last_score": state.last_score,
            "last_fired": state.last_fired,
            "last_eval": state.last_eval,
            "seq": state.seq,
            "lag_s": live.lag_s,
            "next_at": next_at,
            "pending": state.pending is not None,
            "error": live.error,
        }


def event_from_json(raw: str) -> AlertEvent:
    """An AlertEvent back from ``AlertEvent.to_json`` (a pending event in the state)."""
    from streamer.engine.standing.events import AlertKind

    data = json.loads(raw)
    return AlertEvent(
        alert_id=data["alert_id"],
        name=data["name"],
        kind=AlertKind(data["kind"]),
        state=AlertState(data["state"]),
        streams=tuple(data["streams"]),
        at=float(data["at"]),
        window=(float(data["window"][0]), float(data["window"][1])),
        text=data["text"],
        score=data["score"],
        threshold=data["threshold"],
        frames=tuple(EvidenceFrame(**frame) for frame in data["frames"]),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    code = getattr(exc, "code", type(exc).__name__)
    return f"{code}: {one_line(exc)}"
