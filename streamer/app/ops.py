"""Operating the daemon: health, readiness, metrics, the HTTP API's backend, the watchdog.

:class:`Operations` exists from the first moment of ``Daemon.run`` (so ``/healthz`` and
``/readyz`` answer while the model loads) and is handed the running parts as a
:class:`Runtime` once they are built. Everything it reports is read from immutable stats
snapshots at the moment it is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory.frames import FrameStats, FrameStore
from sinks.fleet.router import FleetRouter
from sinks.intake import QueryIntake
from sinks.metrics import (
    BATCH_BUCKETS_S,
    AlertChannelMetrics,
    AlertMetrics,
    AlertRuleMetrics,
    EncoderMetrics,
    FrameMetrics,
    Histogram,
    MetricsSnapshot,
    QueryMetrics,
    StreamMetrics,
    build_registry,
    render,
)
from sinks.replies import ReplyPublisher
from sinks.schema import AlertsStatus, DaemonStatus, ForgetRequest, forgotten_event
from sinks.settings import QuerySettings
from sinks.status import StatusPublisher
from streamer import __version__
from streamer.app.api.answers import AnswerHub, Subscription
from streamer.app.engine_port import EnginePort
from streamer.app.notify import SystemdNotifier
from streamer.app.ops_settings import HttpSettings
from streamer.engine.errors import NotReady
from streamer.engine.types import Ticket
from streamer.ingest.supervisor import StreamIngest
from streamer.ingest.types import StreamState

log = logging.getLogger(__name__)


@dataclass
@dataclass(frozen=True)
class Runtime:
    """The running parts operations reads from (built by the daemon)."""

    port: EnginePort
    hub: AnswerHub
    intake: QueryIntake
    replies: ReplyPublisher
    status_publisher: StatusPublisher
    ingests: list[StreamIngest]  # the live list: reloads add and remove streams
    status: Callable[[], DaemonStatus]
    forget: Callable[[ForgetRequest], Awaitable[None]]
    model: str
    device: str
    frames: FrameStore | None = None  # evidence frames served at /frames/... (None: off)
    alerts: Callable[[], dict[str, Any] | None] | None = None  # standing queries' status
    router: FleetRouter | None = None  # requests routed over the fleet from here


class Operations:
    def __init__(
        self,
        settings: HttpSettings,
        query_settings: QuerySettings,
        *,
        notifier: SystemdNotifier,
        reload: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        self.query_settings = query_settings
        self._settings = settings
        self._notifier = notifier
        self._reload = reload
        self._runtime: Runtime | None = None
        self._registry = build_registry(self.metrics_snapshot)
        self.reloads: Counter[str] = Counter()
        self._batch_seconds = Histogram(BATCH_BUCKETS_S)
        self._batches_seen = 0

    def attach(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def detach(self) -> None:
        """Stopping: not ready any more, no new queries."""
        self._runtime = None

    # ---- loops --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Heartbeat the device thread; feed the systemd watchdog while it answers."""
        interval = self._settings.heartbeat_interval_s
        watchdog_s = self._notifier.watchdog_interval_s
        fed_at = 0.0
        beating: asyncio.Task[None] | None = None
        try:
            while True:
                runtime = self._runtime
                if runtime is not None and (beating is None or beating.done()):
                    beating = asyncio.ensure_future(runtime.port.heartbeat())
                if runtime is not None:
                    self._sample_batches(runtime)
                now = time.monotonic()
                if watchdog_s is not None and now - fed_at >= watchdog_s and self.health()[0]:
                    self._notifier.watchdog()
                    fed_at = now
                await asyncio.sleep(min(interval, watchdog_s or interval))
        finally:
            if beating is not None:
                beating.cancel()
                with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                    await beating

    def _sample_batches(self, runtime: Runtime) -> None:
        # The engine keeps the last batch's time only: batches run since the last look are
        # counted at that time (exact when at most one batch runs per heartbeat interval).
        stats = runtime.port.stats()
        new = stats.batches - self._batches_seen
        if new > 0:
            self._batch_seconds.observe(stats.last_batch_ms / 1000.0, new)
        self._batches_seen = stats.batches

    # ---- probes -------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        runtime = self._runtime
        age = runtime.port.heartbeat_age_s() if runtime is not None else None
        if age is None:  # starting: the device thread has not been asked yet
            return True, {"device_heartbeat_age_s": None}
        return age < self._settings.heartbeat_stale_s, {"device_heartbeat_age_s": round(age, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        runtime = self._runtime
        if runtime is None:
            return False, {"model_loaded": False, "redis": False, "streams_up": 0}
        redis_up = runtime.intake.connected
        up = sum(1 for i in runtime.ingests if i.state is not StreamState.FAILED)
        detail = {"model_loaded": True, "redis": redis_up, "streams_up": up}
        return redis_up and up > 0, detail

    # ---- metrics ------------------------------------------------------------------------------

    def metrics(self) -> bytes:
        return render(self._registry)

    def metrics_snapshot(self) -> MetricsSnapshot | None:
        runtime = self._runtime
        if runtime is None:
            return None
        port, hub = runtime.port, runtime.hub
        engine = port.stats()
        streams = []
        for ingest in runtime.ingests:
            stats = ingest.stats()
            memory = port.memory_stats(stats.name)
            dropped = dict(stats.dropped)
            refused = engine.refused.get(stats.name, 0)
            if refused:
                dropped["memory_refused"] = refused
            streams.append(
                StreamMetrics(
                    name=stats.name,
                    state=stats.state.value,
                    frames_in=stats.frames_in,
                    frames_sampled=stats.frames_sampled,
                    dropped=dropped,
                    clips=stats.clips,
                    reconnects=stats.reconnects,
                    stalls_last_hour=stats.stalls_last_hour,
                    gaps=stats.gaps,
                    **_memory_fields(memory),
                )
            )
        queries = QueryMetrics(
            answered=hub.answered,
            failed=hub.failed,
            errors=dict(hub.errors),
            in_flight=engine.in_flight,
            queued=engine.pending,
            latency_seconds=hub.latency.snapshot(),
            ttft_seconds=hub.ttft.snapshot(),
            intake=dict(runtime.intake.counters),
            entries_in_flight=runtime.intake.in_flight_entries,
            tokens_dropped=runtime.replies.tokens_dropped + hub.tokens_dropped,
            finals_unstored=runtime.replies.finals_unstored,
        )
        snapshots = port.snapshot_health()
        return MetricsSnapshot(
            version=__version__,
            model=runtime.model,
            device=runtime.device,
            model_loaded=True,
            heartbeat_age_s=port.heartbeat_age_s(),
            redis_up=runtime.intake.connected,
            status_skipped=runtime.status_publisher.skipped,
            streams=tuple(streams),
            encoder=EncoderMetrics(
                clips=engine.clips_encoded,
                batches=engine.batches,
                lag_s=engine.lag_s,
                batch_seconds=self._batch_seconds.snapshot(),
            ),
            queries=queries,
            snapshots_enabled=snapshots.enabled,
            snapshot_last_success=snapshots.last_success_at,
            snapshot_failures=snapshots.failures,
            snapshot_bytes_written=snapshots.bytes_written,
            reloads=dict(self.reloads),
            alerts=None if runtime.alerts is None else alert_metrics(runtime.alerts()),
            frames=None if runtime.frames is None else frame_metrics(runtime.frames.stats()),
            routing=None if runtime.router is None else dict(runtime.router.counters),
            coordinating=0 if runtime.router is None else runtime.router.coordinating,
        )

    # ---- the HTTP API's backend ---------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        runtime = self._runtime
        return None if runtime is None else runtime.status().model_dump(mode="json")

    def answer(self, request_id: str) -> dict[str, Any] | None:
        runtime = self._runtime
        return None if runtime is None else runtime.hub.answer(request_id)

    def frame_file(self, stream: str, name: str) -> Path | None:
        """The file of a stored evidence frame, or None (unknown, or frames are off)."""
        runtime = self._runtime
        if runtime is None or runtime.frames is None:
            return None
        return runtime.frames.path_of(stream, name)

    async def ask(self, ticket: Ticket) -> Subscription:
        runtime = self._ready_runtime()
        subscription = runtime.hub.subscribe(ticket.request.id)
        try:
            await runtime.port.submit(ticket)
        except BaseException:
            runtime.hub.unsubscribe(ticket.request.id, submitted=False)
            raise
        return subscription

    def abandon(self, request_id: str) -> None:
        runtime = self._runtime
        if runtime is not None:
            runtime.hub.unsubscribe(request_id, submitted=True)
            runtime.port.cancel(request_id)

    async def forget(self, request: ForgetRequest) -> dict[str, Any]:
        await self._ready_runtime().forget(request)
        confirmation: dict[str, Any] = json.loads(forgotten_event(request))
        confirmation.pop("type", None)
        return confirmation

    async def reload(self) -> dict[str, Any]:
        self._ready_runtime()
        return await self._reload()

    def _ready_runtime(self) -> Runtime:
        if self._runtime is None:
            raise NotReady("the daemon is starting or stopping; try again shortly")
        return self._runtime


_DELIVERY_OUTCOMES = ("offered", "delivered", "retried", "dropped", "failed")


def alert_metrics(status: dict[str, Any] | None) -> AlertMetrics | None:
    """The metrics of the standing queries' status (``AlertManager.status``); None when no
    rule runs."""
    if status is None:
        return None
    shown = AlertsStatus.model_validate(status)
    return AlertMetrics(
        rules=tuple(
            AlertRuleMetrics(r.name, r.kind, r.state == "firing", r.last_score) for r in shown.rules
        ),
        activity=dict(shown.counters),
        channels=tuple(
            AlertChannelMetrics(
                str(sink["channel"]),
                int(sink.get("queued", 0)),
                {k: int(sink[k]) for k in _DELIVERY_OUTCOMES if k in sink},
            )
            for sink in shown.sinks
        ),
    )


def frame_metrics(stats: FrameStats) -> FrameMetrics:
    return FrameMetrics(
        frames=stats.frames,
        bytes=stats.bytes,
        budget_bytes=stats.budget_bytes,
        queued=stats.queued,
        outcomes={"written": stats.written, "dropped": stats.dropped, "failed": stats.failed,
                  "evicted": stats.evicted},
    )  # fmt: skip


def _memory_fields(memory: Any) -> dict[str, Any]:
    if memory is None:
        return {}
    return {
        "memory_tokens": memory.tokens,
        "memory_budget_tokens": memory.budget_tokens,
        "memory_bytes": memory.bytes,
        "memory_budget_bytes": memory.budget_bytes,
        "memory_fill": memory.fill,
        "memory_segments": memory.segments,
        "memory_gap_seconds": memory.gap_seconds,
    }
