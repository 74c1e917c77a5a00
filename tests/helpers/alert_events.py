"""Alert events for the delivery tests and benchmark."""

from __future__ import annotations

import time

from memory.evidence import EvidenceFrame
from streamer.engine.standing.events import AlertEvent, AlertKind, AlertState


def alert_event(
    name: str = "door", sequence: int = 1, state: AlertState = AlertState.FIRED
) -> AlertEvent:
    """A condition event (or a summary, with ``state=SUMMARY``) with one evidence frame."""
    kind = AlertKind.SUMMARY if state is AlertState.SUMMARY else AlertKind.CONDITION
    now = time.time()
    return AlertEvent(
        alert_id=f"{name}:{sequence}",
        name=name,
        kind=kind,
        state=state,
        streams=("cam1",),
        at=now,
        window=(now - 16.0, now),
        text="a person stands at the door",
        score=0.93 if kind is AlertKind.CONDITION else None,
        threshold=0.8 if kind is AlertKind.CONDITION else None,
        frames=(EvidenceFrame("cam1", now - 4.0, now, "/var/lib/flashwatch/frames/1.jpg"),),
    )
