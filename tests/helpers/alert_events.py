"""Alert events for the delivery tests and benchmark, and a bounded wait."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest

from memory.evidence import EvidenceFrame
from streamer.engine.standing.events import AlertEvent, AlertKind, AlertSink, AlertState

SinkT = TypeVar("SinkT", bound=AlertSink)


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


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` until truthy; fail the test after ``timeout_s`` (generous: CI
    machines are shared)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(sink: SinkT) -> AsyncIterator[SinkT]:
    """``sink`` with its delivery task running; stopped and closed after the block."""
    task = asyncio.get_running_loop().create_task(sink.run())
    try:
        yield sink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sink.aclose()
