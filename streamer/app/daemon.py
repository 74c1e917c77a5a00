"""The composition root: builds every component from the config and runs them together.

    sources ──▶ StreamIngest (per stream: sample, clips, reconnect) ──clips──▶ Engine
    Redis ──▶ QueryIntake ──tickets──▶ Engine (device thread: encode, plan, prefill, decode)
    Engine ──▶ MemoryBank (per-stream token arenas)      Engine ──▶ ReplyPublisher ──▶ Redis
    every second: status snapshot ──▶ StatusPublisher (Redis) and the rich live view
    HTTP (streamer.app.api): /metrics, /healthz, /readyz, /v1/* ──▶ Operations ──▶ Engine
    SIGHUP or POST /v1/config/reload: re-read the config, add/remove/change streams live

Redis: the configured one, waited for with backoff while it is down (ingest runs meanwhile);
only the built-in demo with no configured URL gets a private redis-server. One daemon per
``fleet.daemon_id`` on a Redis and key prefix: a second with the same id refuses to start
(sinks.daemon_lock), and the intake reads no request before this daemon's presence is written.
Daemons with different ids share a Redis as a fleet: each runs only the streams it holds a
lease on (streamer.app.fleet), adopting those of a daemon that died; requests naming another's
streams are routed to it (sinks.fleet.router), and each daemon's inbox is read by a second
intake.

Shutdown (SIGINT/SIGTERM): stop intake, stop ingest, stop the engine (durable requests still in
flight stay pending in Redis and are answered after the next start), snapshot memory, stop the
rest. Nothing here is global: every object is built here and handed what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory.bank import MemoryBank, MemoryStats
from memory.frames import FrameStore
from memory.settings import MemorySettings
from memory.snapshot import folder_for, recorded_fence
from model.errors import ConfigError
from model.loader import LoadedModel, load_model
from sinks.alerts.build import build_sinks
from sinks.connection import REDIS_DOWN_ERRORS, RedisClient, open_redis, redis_backoff
from sinks.daemon_lock import DaemonLock
from sinks.errors import BusError
from sinks.fleet.router import FleetRouter
from sinks.fleet.status import FleetWatch
from sinks.intake import QueryIntake
from sinks.redact import redact_url
from sinks.replies import ReplyPublisher
from sinks.schema import DaemonStatus, FleetStatus, ForgetRequest, RedisStatus
from sinks.settings import Keys
from sinks.status import StatusPublisher
from sinks.tui import LiveView
from streamer import __version__
from streamer.app.alerts import AlertManager
from streamer.app.api.answers import AnswerHub
from streamer.app.api.server import HttpServer
from streamer.app.config import FlashwatchConfig, load_config, state_dir
from streamer.app.embedded_redis import EmbeddedRedis, reachable
from streamer.app.engine_port import EnginePort
from streamer.app.evidence import FramedReplies
from streamer.app.fleet import FleetReconciler
from streamer.app.notify import SystemdNotifier
from streamer.app.ops import Operations, Runtime
from streamer.app.reload import StreamSet, effective_config, plan_reload
from streamer.engine.core import Engine, EngineStats
from streamer.engine.errors import UnknownStream
from streamer.ingest.settings import StreamSettings
from streamer.ingest.supervisor import StreamIngest
from streamer.ingest.types import GapEvent, MotionStats, StreamState
from streamer.ingest.whip_server import WhipServer

log = logging.getLogger(__name__)

_RECENT_GAPS = 20
FLEET_VIEW_INTERVAL_S = 2.0  # how often the live view re-reads the fleet from Redis


@dataclass
class _Parts:
    """Everything the running daemon owns, built once by ``Daemon._build``."""

    loaded: LoadedModel
    bank: MemoryBank
    engine: Engine
    ingests: list[StreamIngest]
    whip: WhipServer | None
    intake: QueryIntake
    replies: ReplyPublisher
    status: StatusPublisher
    gaps: dict[str, list[GapEvent]]
    streams: StreamSet
    port: EnginePort
    frames: FrameStore | None  # evidence frames (None: off)
    fleet_view: FleetWatch  # every daemon and stream of the fleet, for the live view
    alerts: AlertManager
    alerts_client: RedisClient
    recent_gap: Callable[[GapEvent], None]  # status's recent gaps only (memory has it)
    inbox: QueryIntake  # sub-requests other daemons' coordinators route here (fleet)
    router: FleetRouter


class Daemon:
    def __init__(
        self,
        config: FlashwatchConfig,
        *,
        tui: bool,
        private_redis: bool,
        config_path: Path | None = None,
        overrides: tuple[tuple[str, ...], tuple[str, ...], str | None] = ((), (), None),
    ) -> None:
        """``private_redis``: the built-in demo with no configured Redis URL (see
        ``config.private_redis_allowed``); only then may a private redis-server be started.
        ``config_path`` and ``overrides`` are what a reload re-reads."""
        self._config = config
        self._tui = tui and config.status.tui
        self._private_redis = private_redis
        self._started_at = time.time()
        self._started_mono = time.monotonic()  # uptime survives wall-clock steps
        self._stop = asyncio.Event()
        self._embedded: EmbeddedRedis | None = None
        # what a reload re-reads: the same file with the same --set/--source/--redis-url
        self._config_path = config_path
        self._overrides = overrides
        self._reload_lock = asyncio.Lock()
        self._parts: _Parts | None = None
        self._notifier = SystemdNotifier.from_environ(os.environ)
        self._ops = Operations(
            config.http, config.query, notifier=self._notifier, reload=self.reload
        )
        self._background: set[asyncio.Task[Any]] = set()
        self._lock: DaemonLock | None = None
        self._fleet: FleetReconciler | None = None
        self._candidates: list[StreamSettings] = list(config.streams)  # what the config lists
        self._retired: set[str] = set()  # failed streams whose share went to the others
        self._http_url: str | None = None  # where /frames/... is served, once HTTP runs

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until SIGINT/SIGTERM. Raises ConfigError/BusError for start-up problems."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        http = await self._start_http()  # first: the probes answer while the model loads
        operations = asyncio.ensure_future(self._ops.run())
        try:
            redis_url = await self._redis()
            await self._claim_redis(redis_url)
            assert self._fleet is not None
            owned = await self._fleet.start(self._recorded_fence)
            parts = await self._build(redis_url, owned)
            await self._serve(parts)
        finally:
            self._notifier.stopping()
            operations.cancel()
            await asyncio.wait({operations})
            if http is not None:
                await http.stop()
            if self._fleet is not None:
                await self._fleet.stop()  # after the final snapshot: an adopter restores it
            if self._lock is not None:
                await self._lock.release()
            if self._embedded is not None:
                await self._embedded.stop()

    async def _start_http(self) -> HttpServer | None:
        if not self._config.http.enabled:
            return None
        http = HttpServer(self._ops, self._config.http)
        try:
            await http.start()
        except OSError as exc:
            where = f"{self._config.http.host}:{self._config.http.port}"
            raise ConfigError(f"cannot serve HTTP on {where}: {exc.strerror or exc}") from exc
        log.info("HTTP API, metrics and probes at %s", http.url)
        self._http_url = http.url
        return http

    # ---- start-up ---------------------------------------------------------------------------

    async def _redis(self) -> str:
        """The Redis URL to use: the configured one, or a private one for the built-in demo."""
        url = self._config.redis.url
        if not self._private_redis:
            return url
        if EmbeddedRedis.available():
            self._embedded = EmbeddedRedis(state_dir())
            url = await self._embedded.start()  # DaemonConflict when a demo already runs
            log.info("the demo's private Redis (not persistent) is at %s", url)
            log.info("reach it with: redis-cli -u %s  (flashwatch ask/status find it)", url)
            return url
        if await reachable(url, self._config.redis.connect_timeout_s):
            return url
        raise BusError(
            f"Redis at {redact_url(url)} is unreachable and redis-server is not installed "
            "(apt-get install redis-server, or pass --redis-url)"
        )

    async def _claim_redis(self, redis_url: str) -> None:
        """Take this Redis and prefix for this daemon, or go on waiting for Redis with backoff.

        Raises DaemonConflict (another daemon serves them) and BusAccessDenied (wrong or
        missing password, ACL permissions) at once, before the model is loaded.
        """
        settings = self._config.redis.model_copy(update={"url": redis_url})
        fleet = FleetReconciler(
            self._config.fleet, settings, candidates=lambda: self._candidates,
            lock=self._reload_lock,
        )  # fmt: skip
        self._fleet = fleet
        self._lock = DaemonLock(
            settings, self._config.query, self._config.fleet,
            streams=lambda: (tuple(s.name for s in self._candidates), fleet.leases.owned()),
        )  # fmt: skip
        if not await self._lock.try_acquire():
            log.warning("serving ingest meanwhile; questions are read once Redis answers")

    def _recorded_fence(self, stream: str) -> int:
        """The highest fence the stream's snapshot folder records (the floor of its lease)."""
        directory = self._config.memory.snapshot_dir
        return 0 if directory is None else recorded_fence(folder_for(Path(directory), stream))

    async def _build(self, redis_url: str, owned: list[StreamSettings]) -> _Parts:
        """Build the daemon with the streams it owns (``owned``; the fleet adopts others)."""
        config = self._config
        log.info("loading model %s", config.model.checkpoint)
        loaded = await asyncio.to_thread(load_model, config.model)
        log.info(
            "model ready: %s on %s (%s, attention %s)",
            config.model.checkpoint, loaded.device, loaded.dtype, loaded.attention,
        )  # fmt: skip
        bank = MemoryBank(
            config.memory,
            hidden_size=loaded.model.hidden_size,
            dtype=loaded.dtype,
            device=loaded.device,
            fingerprint=loaded.fingerprint,
        )
        for stream in owned:
            bank.add_stream(stream.name)
        bank.restore_snapshots()  # says what it restored or moved aside, in the log
        frames = await self._open_frames(config.memory)
        if frames is not None:  # frames newer than the restored memory (a crash) must go
            coverage = {s.name: bank.view(s.name).span for s in owned}
            removed = await asyncio.to_thread(frames.reconcile, coverage)
            if removed:
                log.info("evidence frames: %d newer than the restored memory deleted", removed)
        redis_settings = config.redis.model_copy(update={"url": redis_url})
        replies = ReplyPublisher(redis_settings, config.query, daemon_id=config.fleet.daemon_id)
        hub = AnswerHub(
            replies, keep=config.http.answers_kept, max_subscribers=config.http.max_subscribers
        )
        engine = Engine(
            loaded,
            bank,
            hub
            if frames is None
            else FramedReplies(hub, frames, limit=config.memory.frames.max_per_answer),
            config.query,
            # The batch size stays in the model section, where the checkpoints' configs set it.
            config.engine.model_copy(
                update={"encode_batch_clips": config.model.encode_batch_clips}
            ),
            model_name=config.model.checkpoint,
        )
        gaps: dict[str, list[GapEvent]] = {s.name: [] for s in owned}

        def on_gap_recent(event: GapEvent) -> None:
            recent = gaps.get(event.stream)
            if recent is None:  # a stream removed by a reload meanwhile
                return
            recent.append(event)
            del recent[:-_RECENT_GAPS]

        def on_gap(event: GapEvent) -> None:
            on_gap_recent(event)
            engine.record_gap(event)

        needs_whip = any(s.url.startswith("whip:") for s in config.streams)
        whip = WhipServer(config.ingest.whip) if needs_whip or config.ingest.whip.enabled else None

        def make_ingest(stream: StreamSettings) -> StreamIngest:
            if whip is None and stream.url.startswith("whip:"):
                raise ConfigError(f"stream {stream.name!r}: a new WHIP stream needs a restart")
            return StreamIngest(
                stream, config.ingest, image_size=loaded.model.image_size, on_gap=on_gap,
                whip=whip, on_still=None if frames is None else frames.offer,
            )  # fmt: skip

        ingests = [make_ingest(stream) for stream in owned]
        for ingest in ingests:
            engine.add_source(ingest.settings.name, ingest.clips, ingest.settings.fps)
        port = EnginePort(engine, bank, frames)
        streams = StreamSet(ingests, gaps, make_ingest, port)
        await engine.on_device(engine.refresh_memory_stats)

        async def forget(request: ForgetRequest) -> None:
            if request.stream not in gaps:
                raise UnknownStream(f"unknown stream {request.stream!r}")
            await engine.forget(request.stream, request.since, request.until)
            if frames is not None:
                await asyncio.to_thread(frames.forget, request.stream, request.since,
                                        request.until)  # fmt: skip
            on_gap_recent(GapEvent(request.stream, request.since, request.until, "forgotten"))

        assert self._fleet is not None
        leases = self._fleet.leases
        router = FleetRouter(
            redis_settings, config.query, config.fleet, replies=replies, local=leases.owned
        )

        def cancel(request_id: str) -> None:
            if not router.cancel(request_id):  # coordinated here, or answered by the engine
                engine.cancel(request_id)

        intake = QueryIntake(
            redis_settings,
            config.query,
            submit=engine.submit,
            cancel=cancel,
            forget=forget,
            room=engine.room,
            replies=replies,
            router=router,
        )
        inbox = QueryIntake(
            redis_settings,
            config.query,
            submit=engine.submit,
            cancel=engine.cancel,
            room=engine.room,
            replies=replies,
            stream_key=Keys(redis_settings.prefix).inbox(config.fleet.daemon_id),
            channels=False,
        )
        status = StatusPublisher(redis_settings, config.status, daemon_id=config.fleet.daemon_id)
        alerts_client = open_redis(redis_settings, read_timeout_s=30.0)
        keys = Keys(redis_settings.prefix)

        def window_end(stream: str) -> float | None:
            stats = engine.memory_stats(stream)
            return None if stats is None or stats.span is None else stats.span[1]

        alert_sinks = build_sinks(
            config.alerts.delivery, redis_settings, keys, redis_client=alerts_client
        )
        alerts = AlertManager(
            config.alerts,
            engine,
            window_end,
            alert_sinks,
            alerts_client,
            keys,
            frames=None if frames is None else frames.frames_for,
        )
        parts = _Parts(
            loaded, bank, engine, ingests, whip, intake, replies, status, gaps, streams, port,
            frames, FleetWatch(redis_settings, FLEET_VIEW_INTERVAL_S), alerts, alerts_client,
            on_gap_recent, inbox, router,
        )  # fmt: skip
        self._ops.attach(
            Runtime(
                port=port,
                hub=hub,
                intake=intake,
                replies=replies,
                status_publisher=status,
                ingests=ingests,
                status=lambda: self.status(parts),
                forget=forget,
                model=config.model.checkpoint,
                device=str(loaded.device),
                frames=frames,
                alerts=lambda: alerts_status(alerts),
                router=router,
            )
        )
        return parts

    async def _open_frames(self, memory: MemorySettings) -> FrameStore | None:
        """The evidence frame store, its folder read (None when frames are off)."""
        folder = memory.frames_dir()
        if folder is None:
            return None
        frames = FrameStore(memory.frames, Path(folder))
        frames.url_base = self._http_url
        try:
            await asyncio.to_thread(frames.open)
        except OSError as exc:
            raise ConfigError(f"memory.frames: cannot use {folder}: {exc.strerror or exc}") from exc
        log.info("evidence frames in %s", folder)
        return frames

    # ---- running ----------------------------------------------------------------------------

    async def _serve(self, parts: _Parts) -> None:
        if parts.whip is not None:
            await parts.whip.start()
            log.info("WHIP ingest at %s", parts.whip.url)
        tasks: dict[str, asyncio.Task[Any]] = {}

        def spawn(name: str, coro: Coroutine[Any, Any, Any]) -> None:
            tasks[name] = asyncio.create_task(coro, name=name)

        assert self._fleet is not None
        self._fleet.attach(parts.streams, parts.port, parts.recent_gap)
        await self._fleet.claim_started()  # before any snapshot of theirs is written
        parts.streams.start_all()
        spawn("engine", parts.engine.run())
        spawn("redis", self._hold_redis())
        spawn("intake", self._intake(parts))
        spawn("inbox", self._inbox(parts))
        spawn("router", parts.router.run())
        spawn("status", self._publish_status(parts))
        spawn("fleet", self._fleet.run())
        view = None
        if self._tui:
            spawn("fleet-view", parts.fleet_view.run())
            view = LiveView(lambda: self.status(parts), fleet=lambda: parts.fleet_view.latest)
        spawn("alerts", parts.alerts.serve(redis_backoff(self._config.redis)))
        if view is not None:
            view.start()
        log.info("flashwatch is running: %d stream(s); Ctrl-C stops", len(parts.ingests))
        self._parts = parts
        self._notifier.ready(f"{len(parts.ingests)} stream(s)")
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                [stopper, *tasks.values()], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            if view is not None:
                view.stop()
                await view.wait_closed()
            await self._shutdown(parts, tasks)

    async def _shutdown(self, parts: _Parts, tasks: dict[str, asyncio.Task[Any]]) -> None:
        log.info("shutting down")
        self._parts = None  # no reload from now on
        self._ops.detach()
        await _cancel(tasks.pop("fleet"))
        await _cancel(tasks.pop("intake"))
        await _cancel(tasks.pop("inbox"))
        await _cancel(tasks.pop("router"))
        await parts.router.aclose()
        await _cancel(tasks.pop("alerts"))
        await parts.alerts.aclose()  # the sinks: what they still queue is counted dropped
        await parts.streams.stop_all()
        for name in ("engine",):
            await _cancel(tasks.pop(name))
        for task in list(self._background):
            await _cancel(task)
        await self._snapshot(parts)
        for name in parts.bank.streams():
            view = parts.bank.view(name)
            if view.span is not None:
                log.info(
                    "memory %r at stop: %d tokens, span %.3f–%.3f",
                    name, view.tokens_held, view.span[0], view.span[1],
                )  # fmt: skip
        parts.engine.close()
        if parts.frames is not None:  # what is queued is written first
            await asyncio.to_thread(parts.frames.close)
        parts.bank.close()  # the snapshot writer thread, after what it has queued
        with contextlib.suppress(Exception):  # a last status is best effort
            await parts.status.publish(self.status(parts, state_override="stopped"))
        for task in tasks.values():  # the status loop, and the Redis lock's heartbeat
            await _cancel(task)
        if parts.whip is not None:
            await parts.whip.stop()
        await parts.replies.aclose()
        await parts.status.aclose()
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await parts.alerts_client.aclose()
        log.info("stopped")

    async def _hold_redis(self) -> None:
        """Renew the Redis lock (retrying while Redis is away); raises DaemonConflict if lost."""
        assert self._lock is not None
        await self._lock.run()

    async def _intake(self, parts: _Parts) -> None:
        """Read requests only once this daemon holds its Redis and prefix."""
        assert self._lock is not None
        await self._lock.owned.wait()
        await parts.intake.run()

    async def _inbox(self, parts: _Parts) -> None:
        """Sub-requests routed here by other daemons' coordinators, once presence is written."""
        assert self._lock is not None
        await self._lock.owned.wait()
        await parts.inbox.run()

    async def _publish_status(self, parts: _Parts) -> None:
        while True:
            try:
                await self._retire_failed(parts)
                if self._lock is None or self._lock.owned.is_set():  # never over another's
                    await parts.status.publish(self.status(parts))
            except Exception:  # a bad snapshot must not stop the daemon; try again next time
                log.exception("retiring a failed stream, or building or publishing the status")
            await asyncio.sleep(self._config.status.publish_interval_s)

    async def _retire_failed(self, parts: _Parts) -> None:
        """A stream whose source failed for good keeps its history but hands the rest of its
        memory share to the other streams."""
        for ingest in parts.ingests:
            name = ingest.settings.name
            if ingest.stats().state is StreamState.FAILED and name not in self._retired:
                self._retired.add(name)
                parts.engine.source_failed(name)
                await parts.engine.on_device(parts.bank.retire_stream, name)
                await parts.engine.on_device(parts.engine.refresh_memory_stats)
                log.info("stream %r failed: its unused memory share goes to the others", name)

    async def _snapshot(self, parts: _Parts) -> None:
        """The last snapshot, on the device thread (periodic ones are engine maintenance).

        Never raises: a failed write is one warning and a counter in status (``memory``), and a
        clean stop still exits 0 when the disk is full.
        """
        try:
            await parts.engine.on_device(parts.bank.flush_snapshots)
        except Exception as exc:  # noqa: BLE001 - belt and braces: the bank counts its own
            log.warning("the final snapshot failed: %s", " ".join(str(exc).split()))

    # ---- live reconfiguration ----------------------------------------------------------------

    def _reload_in_background(self) -> None:
        """SIGHUP: reload on a task (a signal handler must not block)."""
        task = asyncio.ensure_future(self.reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload(self) -> dict[str, Any]:
        """Re-read the config; apply stream changes and ``log_level``; report the rest."""
        async with self._reload_lock:
            parts = self._parts
            if parts is None:
                return {"ok": False, "error": "the daemon is starting or stopping"}
            sets, sources, redis_url = self._overrides
            try:
                new = load_config(self._config_path, sets=sets, sources=sources,
                                  redis_url=redis_url)  # fmt: skip
            except ConfigError as exc:
                self._ops.reloads["invalid"] += 1
                log.error("reload: config not applied: %s", exc)
                return {"ok": False, "error": str(exc)}
            self._notifier.reloading()
            current = self._config.model_copy(
                update={"streams": [ingest.settings for ingest in parts.ingests]}
            )
            self._candidates = list(new.streams)
            owned = await self._owned(parts, new)
            plan = plan_reload(current, new.model_copy(update={"streams": owned}))
            report = await parts.streams.apply(plan)
            if self._fleet is not None:
                for name in plan.removed:
                    await self._fleet.forget(name)
            # the streams that run now (one that failed to start is tried again next reload)
            running = [ingest.settings for ingest in parts.ingests]
            self._config = effective_config(self._config, new).model_copy(
                update={"streams": running}
            )
            if "log_level" in plan.applied:
                logging.getLogger().setLevel(new.log_level.upper())
            self._notifier.ready(f"{len(parts.ingests)} stream(s)")
            for key in plan.needs_restart:
                log.warning("reload: %s changed; it takes effect after a restart", key)
            self._ops.reloads["failed" if report.failed else "applied"] += 1
            log.info("reload: %d added, %d removed, %d changed, %d not applied",
                     len(report.added), len(report.removed), len(report.changed),
                     len(report.failed))  # fmt: skip
            return {
                "ok": not report.failed,
                "streams": report.as_dict(),
                "applied": list(plan.applied),
                "needs_restart": list(plan.needs_restart),
            }

    async def _owned(self, parts: _Parts, new: FlashwatchConfig) -> list[StreamSettings]:
        """The streams of ``new`` this daemon runs after a reload: those it runs now, and new
        ones whose lease it can take at once (the others stand by, adopted when free)."""
        running = set(parts.streams.running())
        owned = []
        for stream in new.streams:
            if stream.name in running or self._fleet is None or await self._fleet.take(stream):
                owned.append(stream)
        return owned

    # ---- status -----------------------------------------------------------------------------

    def status(self, parts: _Parts, state_override: str | None = None) -> DaemonStatus:
        """An immutable snapshot of the whole daemon, for the TUI and ``flashwatch status``."""
        now = time.time()
        engine: EngineStats = parts.engine.stats()
        streams = []
        for ingest in parts.ingests:
            stats = ingest.stats()
            memory = parts.engine.memory_stats(stats.name)
            dropped = dict(stats.dropped)
            refused = engine.refused.get(stats.name, 0)
            if refused:
                dropped["memory_refused"] = refused
            if engine.dropped_failed.get(stats.name):
                dropped["stream_failed"] = engine.dropped_failed[stats.name]
            failed = engine.failed_streams.get(stats.name)
            streams.append(
                {
                    "name": stats.name,
                    "url": stats.url,
                    "state": state_override or ("failed" if failed else stats.state.value),
                    "fps_in": stats.fps_in,
                    "fps_sampled": stats.fps_sampled,
                    "dropped": dropped,
                    "clips": stats.clips,
                    "reconnects": stats.reconnects,
                    "reconnects_last_hour": stats.reconnects_last_hour,
                    "stalls_last_hour": stats.stalls_last_hour,
                    "quality": stats.quality,
                    "last_error": failed or stats.last_error,
                    "memory": memory_status(memory) if memory is not None else None,
                    "motion": motion_status(stats.motion, engine.encode_ms_per_clip),
                    "gaps": [
                        {"start": g.start, "end": g.end, "reason": g.reason}
                        for g in parts.gaps[stats.name]
                    ],
                }
            )
        return DaemonStatus.model_validate(
            {
                "v": 1,
                "time": now,
                "daemon": {
                    "pid": os.getpid(),
                    "started_at": self._started_at,
                    "uptime_s": time.monotonic() - self._started_mono,
                    "version": __version__,
                    "model": self._config.model.checkpoint,
                    "device": str(parts.loaded.device),
                },
                "streams": streams,
                "queries": {
                    "pending": engine.pending,
                    "in_flight": engine.in_flight,
                    "completed": engine.completed,
                    "failed": engine.failed,
                    "latency_p50_s": engine.latency_p50_s,
                    "latency_p95_s": engine.latency_p95_s,
                    "ttft_p95_s": engine.ttft_p95_s,
                    "stream_waiting": parts.intake.stream_waiting,
                    "stream_pending": parts.intake.stream_pending,
                    "dead_letters": parts.intake.dead_letters,
                    "prefix_hits": engine.prefix_hits,
                    "prefix_misses": engine.prefix_misses,
                    "kv_slots_free": engine.kv_slots_free,
                },
                "snapshots": dataclasses.asdict(parts.bank.snapshot_health()),
                "frames": None
                if parts.frames is None
                else dataclasses.asdict(parts.frames.stats()),
                "encoder": {
                    "clips_encoded": engine.clips_encoded,
                    "batches": engine.batches,
                    "lag_s": engine.lag_s,
                    "last_batch_ms": engine.last_batch_ms,
                    "failures": engine.encode_failures,
                    "state": engine.state,
                    "failure": engine.failure,
                },
                "redis": self._redis_status(),
                "alerts": alerts_status(parts.alerts),
                "fleet": None if self._fleet is None else fleet_status(self._fleet, parts.router),
            }
        )

    def _redis_status(self) -> RedisStatus | None:
        if self._lock is None:
            return None
        health = self._lock.health
        return RedisStatus(
            state=health.state.value, url=health.url, last_error=health.last_error,
            since=health.since,
        )  # fmt: skip


def fleet_status(fleet: FleetReconciler, router: FleetRouter) -> FleetStatus:
    """Leases and placement, with the counters of the requests routed from here."""
    return fleet.status().model_copy(
        update={"routing": dict(router.counters), "coordinating": router.coordinating}
    )


def alerts_status(alerts: AlertManager) -> dict[str, Any] | None:
    """The status of standing queries; None (no section) while no rule runs."""
    status = alerts.status()
    return status if status["rules"] else None


def memory_status(memory: MemoryStats) -> dict[str, Any]:
    """The status fields of one stream's memory statistics."""
    return {
        "tokens": memory.tokens,
        "budget_tokens": memory.budget_tokens,
        "bytes": memory.bytes,
        "budget_bytes": memory.budget_bytes,
        "fill": memory.fill,
        "span": list(memory.span) if memory.span is not None else None,
        "levels": {str(level): n for level, n in memory.levels.items()},
        "capacity_hours": memory.capacity_hours,
        "segments": memory.segments,
        "static_segments": memory.static_segments,
        "static_seconds": memory.static_seconds,
    }


def motion_status(motion: MotionStats | None, encode_ms_per_clip: float | None) -> Any:
    """The status fields of one stream's motion gate (None when the stream is not gated)."""
    if motion is None:
        return None
    saved = None if encode_ms_per_clip is None else motion.clips_skipped * encode_ms_per_clip / 1e3
    return {**dataclasses.asdict(motion), "encoder_saved_s": saved}


async def _cancel(task: asyncio.Task[Any], timeout_s: float = 10.0) -> None:
    """Cancel ``task`` and wait for it; cancel again if a cancellation was swallowed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        if loop.time() > deadline:
            log.error("%s did not stop within %.0f s; leaving it", task.get_name(), timeout_s)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed while stopping: %s", task.get_name(), task.exception())


__all__ = ["ConfigError", "Daemon"]
