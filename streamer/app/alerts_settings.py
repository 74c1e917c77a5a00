"""The ``alerts:`` section: standing queries from the config, their time zone, delivery."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sinks.alerts.settings import DeliverySettings
from streamer.engine.standing.rules import Rule, RuleList


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AlertSettings(_Strict):
    """Standing queries: conditions evaluated as clips land, and scheduled summaries."""

    rules: list[Rule] = Field(
        default_factory=list,
        max_length=256,
        description="Standing queries from the config (more can be added at run time).",
    )
    timezone: str = Field(
        "UTC",
        min_length=1,
        max_length=64,
        description="IANA time zone of daily summaries (daily_at), e.g. Europe/Berlin.",
    )
    max_rules: int = Field(
        64, ge=1, le=1024, description="Most rules at once, config and run-time ones together."
    )
    tick_s: float = Field(
        0.5, gt=0.0, le=60.0, description="Seconds between checks for due evaluations."
    )
    score_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="Seconds one evaluation round may take."
    )
    frames_per_alert: int = Field(
        4, ge=0, le=64, description="Evidence frames attached to an alert, per stream."
    )
    delivery: DeliverySettings = Field(
        default_factory=DeliverySettings, description="Delivery channels of alert events."
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[Rule]) -> list[Rule]:
        RuleList(rules=rules)  # unique names
        return rules

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)
