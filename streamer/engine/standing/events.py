"""What a standing query emits, and the port every alert delivery implements.

An ``AlertEvent`` is plain data, the same for every channel (Redis stream and pub/sub,
webhooks, MQTT): ``sinks`` turn it into their wire formats and never reach back into the engine.
``alert_id`` is durable: the same event keeps the same id across retries and restarts, so a
receiver deduplicates on it (delivery is at-least-once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from memory.evidence import EvidenceFrame


class AlertKind(StrEnum):
    CONDITION = "condition"  # a yes/no question over a recent window
    SUMMARY = "summary"  # a scheduled summary of the interval since the last run


class AlertState(StrEnum):
    FIRED = "fired"  # rising edge of a condition
    CLEARED = "cleared"  # falling edge of a condition
    SUMMARY = "summary"  # a summary's text


@dataclass(frozen=True, slots=True)
class AlertEvent:
    alert_id: str  # durable: "<name>:<sequence>", one sequence per standing query
    name: str
    kind: AlertKind
    state: AlertState
    streams: tuple[str, ...]
    at: float  # epoch seconds when it was decided
    window: tuple[float, float]  # the interval evaluated or summarised
    text: str  # the explanation of a fired condition, or the summary
    score: float | None = None  # P(yes) of a condition, normalised over yes/no
    threshold: float | None = None
    frames: tuple[EvidenceFrame, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "name": self.name,
            "kind": str(self.kind),
            "state": str(self.state),
            "streams": list(self.streams),
            "at": self.at,
            "window": list(self.window),
            "text": self.text,
            "score": self.score,
            "threshold": self.threshold,
            "frames": [frame.as_dict() for frame in self.frames],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"), ensure_ascii=False)


class AlertSink(Protocol):
    """One delivery channel. ``offer`` never blocks and never raises: a channel queues (bounded)
    and retries on its own task, and counts what it had to drop."""

    name: str

    def offer(self, event: AlertEvent) -> bool:
        """Queue one event; False when it was dropped (queue full, channel closed)."""
        ...

    async def run(self) -> None:
        """Deliver queued events until cancelled."""
        ...

    async def aclose(self) -> None: ...

    def unsettled(self) -> set[str]:
        """Ids of the events it holds and has not delivered nor given up on yet: what a
        restart must offer it again (the manager keeps them in ``Keys.alerts_outbox``)."""
        ...

    def stats(self) -> dict[str, Any]:
        """JSON-ready counters for status: queued, delivered, retried, dropped, last error."""
        ...
