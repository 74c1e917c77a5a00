"""Standing-query rules with a scripted scorer and a scripted clock: debounce, cooldown,
hysteresis, schedules (DST included) and config validation."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from streamer.engine.standing.events import AlertState
from streamer.engine.standing.rules import (
    ConditionRule,
    RuleList,
    RuleState,
    SummaryRule,
    condition_due,
    make_event,
    next_summary_at,
    step_condition,
)


def rule(**kw: object) -> ConditionRule:
    fields: dict[str, object] = {"name": "door", "streams": ["cam"], "question": "Person?", **kw}
    return ConditionRule.model_validate(fields)


def run(r: ConditionRule, scores: list[float], every_s: float = 2.0) -> list[tuple[float, str]]:
    """Feed scripted scores at a scripted clock; the (time, edge) list it produced."""
    state, edges = RuleState(), []
    for i, score in enumerate(scores):
        now = 1000.0 + i * every_s
        state, edge = step_condition(r, state, score, now)
        if edge is not None:
            edges.append((now, str(edge.state)))
            assert edge.seq == state.seq
    return edges


def test_fires_on_the_rising_edge_only() -> None:
    edges = run(rule(threshold=0.6, cooldown_s=0), [0.1, 0.7, 0.8, 0.9, 0.2, 0.3])
    assert edges == [(1002.0, "fired"), (1008.0, "cleared")]


def test_debounce_needs_consecutive_hits() -> None:
    r = rule(threshold=0.6, hits_to_fire=3, cooldown_s=0)
    assert run(r, [0.7, 0.7, 0.1, 0.7, 0.7]) == []  # a miss resets the count
    assert run(r, [0.7, 0.7, 0.7]) == [(1004.0, "fired")]


def test_hysteresis_holds_between_the_thresholds() -> None:
    r = rule(threshold=0.6, clear_threshold=0.3, cooldown_s=0)
    edges = run(r, [0.7, 0.5, 0.4, 0.35, 0.31, 0.29, 0.5, 0.61])
    assert edges == [(1000.0, "fired"), (1010.0, "cleared"), (1014.0, "fired")]
    assert rule(threshold=0.6).clear_below == pytest.approx(0.5)


def test_cooldown_delays_the_next_firing() -> None:
    r = rule(threshold=0.6, clear_threshold=0.3, cooldown_s=10)
    # fires at 1000, clears at 1002, high again at 1004..: may fire only from 1010
    edges = run(r, [0.9, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert edges == [(1000.0, "fired"), (1002.0, "cleared"), (1010.0, "fired")]


def test_sequence_numbers_give_durable_ids() -> None:
    r = rule(cooldown_s=0)
    state = RuleState()
    ids = []
    for i, score in enumerate([0.9, 0.1, 0.9]):
        state, edge = step_condition(r, state, score, float(i))
        assert edge is not None
        event = make_event(r, edge.state, edge.seq, at=float(i), window=(0.0, 1.0), text="")
        ids.append(event.alert_id)
    assert ids == ["door:1", "door:2", "door:3"]
    assert RuleState.from_dict(state.as_dict()) == state


def test_due_on_every_clip_or_every_n_seconds() -> None:
    assert condition_due(rule(), RuleState(), 0.0, new_clip=True)
    assert not condition_due(rule(), RuleState(), 0.0, new_clip=False)
    timed = rule(every_s=5)
    assert condition_due(timed, RuleState(), 0.0, new_clip=False)
    assert not condition_due(timed, RuleState(last_eval=10.0), 14.0, new_clip=True)
    assert condition_due(timed, RuleState(last_eval=10.0), 15.0, new_clip=False)


def test_every_minutes_schedule() -> None:
    r = SummaryRule(name="recap", streams=["cam"], every_minutes=0.5)
    assert next_summary_at(r, 100.0, ZoneInfo("UTC")) == 130.0


def _at(zone: ZoneInfo, *parts: int) -> float:
    return dt.datetime(*parts, tzinfo=zone).timestamp()


def test_daily_schedule_across_dst_changes() -> None:
    ny = ZoneInfo("America/New_York")
    r = SummaryRule(name="recap", streams=["cam"], daily_at="08:00")
    # spring forward (2026-03-08): 08:00 local is still 08:00 local, 23 h after the last
    before = _at(ny, 2026, 3, 7, 8, 0)
    after = next_summary_at(r, before, ny)
    assert dt.datetime.fromtimestamp(after, ny).hour == 8
    assert after - before == 23 * 3600
    # fall back (2026-11-01): 25 h
    before = _at(ny, 2026, 10, 31, 8, 0)
    assert next_summary_at(r, before, ny) - before == 25 * 3600
    # later the same day: tomorrow; earlier: today
    assert next_summary_at(r, _at(ny, 2026, 6, 1, 9, 0), ny) == _at(ny, 2026, 6, 2, 8, 0)
    assert next_summary_at(r, _at(ny, 2026, 6, 1, 7, 0), ny) == _at(ny, 2026, 6, 1, 8, 0)


def test_daily_time_skipped_or_repeated_by_dst_runs_once() -> None:
    ny = ZoneInfo("America/New_York")
    skipped = SummaryRule(name="s", streams=["cam"], daily_at="02:30")  # no 02:30 on 03-08
    at = next_summary_at(skipped, _at(ny, 2026, 3, 7, 12, 0), ny)
    assert dt.datetime.fromtimestamp(at, ny).date() == dt.date(2026, 3, 8)
    repeated = SummaryRule(name="r", streams=["cam"], daily_at="01:30")  # twice on 11-01
    first = next_summary_at(repeated, _at(ny, 2026, 10, 31, 12, 0), ny)
    second = next_summary_at(repeated, first, ny)
    assert dt.datetime.fromtimestamp(first, ny).date() == dt.date(2026, 11, 1)
    assert dt.datetime.fromtimestamp(second, ny).date() == dt.date(2026, 11, 2)


@pytest.mark.parametrize(
    "bad",
    [
        {"threshold": 0.5, "clear_threshold": 0.5},
        {"threshold": 1.0},
        {"hits_to_fire": 0},
        {"name": "has space"},
        {"streams": []},
        {"unknown": 1},
    ],
)
def test_condition_config_is_strict(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        rule(**bad)


def test_summary_needs_one_schedule_and_names_are_unique() -> None:
    with pytest.raises(ValidationError):
        SummaryRule(name="s", streams=["cam"])
    with pytest.raises(ValidationError):
        SummaryRule(name="s", streams=["cam"], every_minutes=1, daily_at="08:00")
    with pytest.raises(ValidationError, match="duplicate"):
        RuleList.model_validate(
            {"rules": [{"kind": "condition", "name": "a", "streams": ["c"], "question": "q"},
                       {"kind": "summary", "name": "a", "streams": ["c"], "every_minutes": 1}]}
        )  # fmt: skip
    assert AlertState.FIRED == "fired"
