"""Live reconfiguration: what a re-read config changes, and the running streams that apply it.

:func:`plan_reload` compares the running config with the new one (a pure function): streams
added, removed or changed are applied without a restart, as is ``log_level``; any other section
that differs is reported as needing a restart and keeps its running value. :class:`StreamSet`
owns the running ingest tasks and applies the stream part: a removed stream's memory is
snapshotted before it is dropped; streams not named in the plan are never touched, so their
ingest goes on without a gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model.errors import FlashwatchError
from streamer.app.config import FlashwatchConfig
from streamer.app.engine_port import EnginePort
from streamer.app.logs import log_context
from streamer.ingest.settings import StreamSettings
from streamer.ingest.supervisor import StreamIngest
from streamer.ingest.types import GapEvent

log = logging.getLogger(__name__)

LIVE_KEYS = frozenset({"streams", "log_level"})  # applied while running
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    added: tuple[StreamSettings, ...]
    removed: tuple[str, ...]
    changed: tuple[StreamSettings, ...]
    applied: tuple[str, ...]  # other keys applied live
    needs_restart: tuple[str, ...]  # sections that differ and keep their running value

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.applied)


def plan_reload(running: FlashwatchConfig, new: FlashwatchConfig) -> ReloadPlan:
    old_streams = {s.name: s for s in running.streams}
    new_streams = {s.name: s for s in new.streams}
    added = tuple(s for name, s in new_streams.items() if name not in old_streams)
    removed = tuple(name for name in old_streams if name not in new_streams)
    changed = tuple(
        s for name, s in new_streams.items() if name in old_streams and old_streams[name] != s
    )
    applied = tuple(["log_level"] if running.log_level != new.log_level else [])
    restart = tuple(
        key
        for key in FlashwatchConfig.model_fields
        if key not in LIVE_KEYS and getattr(running, key) != getattr(new, key)
    )
    return ReloadPlan(added, removed, changed, applied, restart)


def effective_config(running: FlashwatchConfig, new: FlashwatchConfig) -> FlashwatchConfig:
    """The config after a reload: live keys from ``new``, everything else still running."""
    return running.model_copy(update={key: getattr(new, key) for key in LIVE_KEYS})


@dataclass
class StreamReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # stream -> why it was not applied

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed,
                "failed": self.failed}  # fmt: skip


class StreamSet:
    """The running streams: one ingest task each, in ``ingests`` (shared with the status view)."""

    def __init__(
        self,
        ingests: list[StreamIngest],
        gaps: dict[str, list[GapEvent]],
        make_ingest: Callable[[StreamSettings], StreamIngest],
        port: EnginePort,
    ) -> None:
        self.ingests = ingests
        self._gaps = gaps
        self._make_ingest = make_ingest
        self._port = port
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start_all(self) -> None:
        for ingest in self.ingests:
            self._start(ingest)

    async def stop_all(self) -> None:
        for name in list(self._tasks):
            await self._stop(name)

    async def apply(self, plan: ReloadPlan) -> StreamReport:
        report = StreamReport()
        for name in plan.removed:
            await self._attempt(report, name, self._remove(name, report))
        for settings in plan.changed:
            await self._attempt(report, settings.name, self._change(settings, report))
        for settings in plan.added:
            await self._attempt(report, settings.name, self._add(settings, report))
        return report

    async def _attempt(self, report: StreamReport, name: str, work: Any) -> None:
        try:
            await work
        except (FlashwatchError, ValueError) as exc:  # e.g. the memory budget cannot fit it
            report.failed[name] = str(exc)
            log.error("reload: stream %r not applied: %s", name, exc)

    def running(self) -> tuple[str, ...]:
        return tuple(i.settings.name for i in self.ingests)

    async def add(
        self, settings: StreamSettings, *, failover_at: float | None = None
    ) -> GapEvent | None:
        """Start a stream (its memory restored from its snapshot, if any). Raises
        MemoryStoreError when the budget cannot hold it, ConfigError for a WHIP stream that
        needs a restart. ``failover_at``: an adoption, see ``EnginePort.add_stream``; returns
        the failover gap recorded in memory."""
        if settings.name in self._gaps:
            raise ValueError(f"stream {settings.name!r} runs already")
        ingest = self._make_ingest(settings)  # raises for a WHIP stream without the endpoint
        self._gaps[settings.name] = []
        try:
            gap = await self._port.add_stream(
                settings.name, ingest.clips, settings.fps, failover_at=failover_at
            )
        except BaseException:
            del self._gaps[settings.name]
            raise
        self.ingests.append(ingest)
        self._start(ingest)
        return gap

    async def remove(self, name: str, *, snapshot: bool = True) -> list[str]:
        """Stop a stream and drop its memory: snapshotted first (returns the snapshot's
        problems), or, for a stream whose lease is lost, at once and without any write."""
        await self._stop(name)
        self.ingests[:] = [i for i in self.ingests if i.settings.name != name]
        if snapshot:
            problems = await self._port.remove_stream(name)
        else:
            await self._port.drop_stream(name)
            problems = []
        self._gaps.pop(name, None)
        return problems

    async def _add(self, settings: StreamSettings, report: StreamReport) -> None:
        await self.add(settings)
        report.added.append(settings.name)
        log.info("reload: stream %r added", settings.name)

    async def _remove(self, name: str, report: StreamReport) -> None:
        problems = await self.remove(name)
        for problem in problems:
            log.error("reload: %s", problem)
        if problems:
            report.failed[name] = "removed, but its snapshot failed: " + "; ".join(problems)
        report.removed.append(name)
        log.info("reload: stream %r removed (memory snapshotted first)", name)

    async def _change(self, settings: StreamSettings, report: StreamReport) -> None:
        ingest = self._make_ingest(settings)
        await self._stop(settings.name)
        await self._port.replace_feed(settings.name, ingest.clips, settings.fps)
        self.ingests[:] = [ingest if i.settings.name == settings.name else i for i in self.ingests]
        self._start(ingest)
        report.changed.append(settings.name)
        log.info("reload: stream %r restarted with its new settings", settings.name)

    def _start(self, ingest: StreamIngest) -> None:
        name = ingest.settings.name
        with log_context(stream=name):  # the task's log lines carry the stream
            task = asyncio.create_task(ingest.run(), name=f"ingest:{name}")
        task.add_done_callback(_report_crash)
        self._tasks[name] = task

    async def _stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT_S
        while not task.done() and loop.time() < deadline:
            task.cancel()  # again if a cancellation was swallowed
            await asyncio.wait({task}, timeout=0.5)
        if not task.done():
            log.error("ingest of %r did not stop within %.0f s; leaving it", name, STOP_TIMEOUT_S)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped with an error: %r", task.get_name(), task.exception())
