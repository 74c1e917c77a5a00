"""Standing-query rules: what a rule says (typed config) and how it decides (pure functions).

Nothing here reads a clock, a model or Redis: the caller passes ``now`` and a score, and gets a
new frozen state and, on an edge, the event to deliver. That keeps debounce, cooldown,
hysteresis and schedules testable with a scripted scorer and a scripted clock.

Condition (a yes/no question over the last ``window_s`` seconds)::

    clear ── score >= threshold for `hits_to_fire` evaluations in a row, cooldown over ──> firing
    firing ── score < clear_threshold ──> clear
    (a score between the two thresholds keeps the current state: hysteresis)

Each edge (fired, cleared) takes the rule's next sequence number; its ``alert_id`` is
``"<name>:<seq>"``. The caller persists the new state before it offers the event, so a restart
re-offers the same id instead of skipping or duplicating it.

Summary: due at ``every_minutes`` past its last run, or daily at ``daily_at`` local time in the
daemon's time zone (``alerts.timezone``); it covers the interval since its last run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streamer.engine.standing.events import AlertEvent, AlertKind, AlertState

RULE_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_STREAM_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionRule(_Strict):
    """A yes/no question evaluated over a recent window; fires on the rising edge."""

    kind: Literal["condition"] = Field(
        "condition", description="condition (a yes/no question) or summary (the SummaryRule keys)."
    )
    name: str = Field(pattern=RULE_NAME_PATTERN, description="Unique rule name (alert ids).")
    streams: list[Annotated[str, Field(pattern=_STREAM_PATTERN)]] = Field(
        min_length=1, max_length=16, description="Streams the window reads."
    )
    question: str = Field(
        min_length=1, max_length=2000, description="Asked as is; answered Yes or No."
    )
    window_s: float = Field(16.0, gt=0.0, le=3600.0, description="Seconds of recent memory read.")
    every_s: float | None = Field(
        None,
        gt=0.0,
        le=86_400.0,
        description="Seconds between evaluations; unset = on every new clip of its streams.",
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="P(yes) at or above which it hits.")
    clear_threshold: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="P(yes) below which a firing condition clears; below threshold "
        "(hysteresis); unset = threshold - 0.1 (at least 0).",
    )
    hits_to_fire: int = Field(
        1, ge=1, le=1000, description="Consecutive hits needed to fire (debounce)."
    )
    cooldown_s: float = Field(
        60.0, ge=0.0, le=86_400.0, description="Seconds after a firing before it may fire again."
    )
    explain: bool = Field(True, description="Generate a short explanation when it fires.")
    explain_max_tokens: int = Field(48, ge=1, le=512, description="Longest explanation, in tokens.")
    explain_wait_s: float = Field(
        20.0,
        gt=0.0,
        le=600.0,
        description="Seconds to wait for the explanation; the alert goes out without it after.",
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> ConditionRule:
        if self.clear_threshold is not None and self.clear_threshold >= self.threshold:
            raise ValueError("clear_threshold must be below threshold")
        return self

    @property
    def clear_below(self) -> float:
        if self.clear_threshold is not None:
            return self.clear_threshold
        return max(0.0, self.threshold - 0.1)


class SummaryRule(_Strict):
    """A scheduled summary of the interval since its last run."""

    kind: Literal["summary"] = Field("summary", description="A scheduled summary.")
    name: str = Field(pattern=RULE_NAME_PATTERN, description="Unique rule name (alert ids).")
    streams: list[Annotated[str, Field(pattern=_STREAM_PATTERN)]] = Field(
        min_length=1, max_length=16, description="Streams summarised."
    )
    question: str = Field(
        "Summarise what happened.",
        min_length=1,
        max_length=2000,
        description="The instruction asked over the interval.",
    )
    every_minutes: float | None = Field(
        None, gt=0.0, le=7 * 24 * 60.0, description="Minutes between runs (or daily_at)."
    )
    daily_at: str | None = Field(
        None,
        pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$",
        description="Local time HH:MM of a daily run in alerts.timezone (or every_minutes).",
    )
    max_new_tokens: int = Field(256, ge=1, le=4096, description="Longest summary, in tokens.")
    wait_s: float = Field(
        120.0, gt=0.0, le=3600.0, description="Seconds to wait for the summary's text."
    )

    @model_validator(mode="after")
    def _one_schedule(self) -> SummaryRule:
        if (self.every_minutes is None) == (self.daily_at is None):
            raise ValueError("give exactly one of every_minutes and daily_at")
        return self


Rule = Annotated[ConditionRule | SummaryRule, Field(discriminator="kind")]


class RuleList(_Strict):
    """A list of rules, validated together (unique names)."""

    rules: list[Rule] = Field(default_factory=list, max_length=256)

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[ConditionRule | SummaryRule]) -> list[ConditionRule | SummaryRule]:
        names = [rule.name for rule in rules]
        duplicate = sorted({n for n in names if names.count(n) > 1})
        if duplicate:
            raise ValueError(f"duplicate rule names: {', '.join(duplicate)}")
        return rules


# ---- state ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleState:
    """What a rule remembers between evaluations (persisted in ``Keys.alerts_state``)."""

    seq: int = 0  # sequence of the rule's last event
    firing: bool = False
    hits: int = 0  # consecutive hits while clear
    last_fired: float | None = None
    last_score: float | None = None
    last_eval: float | None = None  # when it last ran (a summary: its scheduled time)
    window_end: float | None = None  # end of the last window read, stream seconds
    pending: str | None = None  # JSON of an event decided but not yet offered to every sink

    def as_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "firing": self.firing,
            "hits": self.hits,
            "last_fired": self.last_fired,
            "last_score": self.last_score,
            "last_eval": self.last_eval,
            "window_end": self.window_end,
            "pending": self.pending,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> RuleState:
        def number(key: str) -> float | None:
            value = data.get(key)
            return float(value) if isinstance(value, int | float) else None

        seq = data.get("seq", 0)
        hits = data.get("hits", 0)
        pending = data.get("pending")
        return cls(
            seq=seq if isinstance(seq, int) else 0,
            firing=data.get("firing") is True,
            hits=hits if isinstance(hits, int) else 0,
            last_fired=number("last_fired"),
            last_score=number("last_score"),
            last_eval=number("last_eval"),
            window_end=number("window_end"),
            pending=pending if isinstance(pending, str) else None,
        )


@dataclass(frozen=True, slots=True)
class Edge:
    """A condition changed state: the event to deliver (its text filled in later)."""

    state: AlertState
    seq: int


def alert_id(name: str, seq: int) -> str:
    return f"{name}:{seq}"


def condition_due(rule: ConditionRule, state: RuleState, now: float, new_clip: bool) -> bool:
    """Whether a condition is evaluated now: on a new clip, or every ``every_s`` seconds."""
    if rule.every_s is None:
        return new_clip
    return state.last_eval is None or now - state.last_eval >= rule.every_s


def step_condition(
    rule: ConditionRule, state: RuleState, score: float, now: float
) -> tuple[RuleState, Edge | None]:
    """One evaluation's score -> the new state and the edge it crossed, if any."""
    state = replace(state, last_score=score, last_eval=now)
    if state.firing:
        if score < rule.clear_below:
            seq = state.seq + 1
            return replace(state, firing=False, hits=0, seq=seq), Edge(AlertState.CLEARED, seq)
        return state, None
    hits = state.hits + 1 if score >= rule.threshold else 0
    cooling = state.last_fired is not None and now - state.last_fired < rule.cooldown_s
    if hits >= rule.hits_to_fire and not cooling:
        seq = state.seq + 1
        fired = replace(state, firing=True, hits=0, seq=seq, last_fired=now)
        return fired, Edge(AlertState.FIRED, seq)
    return replace(state, hits=hits), None


def next_summary_at(rule: SummaryRule, last_run: float, zone: ZoneInfo) -> float:
    """Epoch seconds of the run after ``last_run``: ``every_minutes`` later, or the next
    ``daily_at`` local time strictly after it (a time skipped by a DST change runs at the
    same wall-clock offset as before the change, an hour later; a repeated one runs once)."""
    if rule.every_minutes is not None:
        return last_run + rule.every_minutes * 60.0
    assert rule.daily_at is not None
    hour, minute = (int(part) for part in rule.daily_at.split(":"))
    day = dt.datetime.fromtimestamp(last_run, zone).date()
    for _ in range(3):
        local = dt.datetime.combine(day, dt.time(hour, minute), tzinfo=zone)
        at = local.timestamp()
        if at > last_run:
            return at
        day += dt.timedelta(days=1)
    raise AssertionError("unreachable: a daily time always falls within two days")


def make_event(
    rule: ConditionRule | SummaryRule,
    state: AlertState,
    seq: int,
    *,
    at: float,
    window: tuple[float, float],
    text: str,
    score: float | None = None,
) -> AlertEvent:
    kind = AlertKind.CONDITION if isinstance(rule, ConditionRule) else AlertKind.SUMMARY
    threshold = rule.threshold if isinstance(rule, ConditionRule) else None
    return AlertEvent(
        alert_id=alert_id(rule.name, seq),
        name=rule.name,
        kind=kind,
        state=state,
        streams=tuple(rule.streams),
        at=at,
        window=window,
        text=text,
        score=score,
        threshold=threshold,
    )
