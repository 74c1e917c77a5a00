"""The composition root: builds every component from the config and runs them together.

    sources ──▶ StreamIngest (per stream: sample, clips, reconnect) ──clips──▶ Engine
    Redis ──▶ QueryIntake ──tickets──▶ Engine (device thread: encode, plan, prefill, decode)
    Engine ──▶ MemoryBank (per-stream token arenas)      Engine ──▶ ReplyPublisher ──▶ Redis
    every second: status snapshot ──▶ StatusPublisher (Redis) and the rich live view

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
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from memory.bank import MemoryBank, MemoryStats
from model.errors import BusError, ConfigError, UnknownStream
from model.loader import LoadedModel, load_model
from sinks.intake import QueryIntake
from sinks.redact import redact_url
from sinks.replies import ReplyPublisher
from sinks.schema import DaemonStatus, ForgetRequest
from sinks.status import StatusPublisher
from sinks.tui import LiveView
from streamer import __version__
from streamer.app.config import FlashwatchConfig, state_dir
from streamer.app.embedded_redis import EmbeddedRedis, reachable
from streamer.engine.core import Engine, EngineStats
from streamer.ingest.supervisor import StreamIngest
from streamer.ingest.types import GapEvent
from streamer.ingest.whip_server import WhipServer

log = logging.getLogger(__name__)

_RECENT_GAPS = 20


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


class Daemon:
    def __init__(self, config: FlashwatchConfig, *, tui: bool, redis_url_explicit: bool) -> None:
        self._config = config
        self._tui = tui and config.status.tui
        self._redis_url_explicit = redis_url_explicit
        self._started_at = time.time()
        self._started_mono = time.monotonic()  # uptime survives wall-clock steps
        self._stop = asyncio.Event()
        self._embedded: EmbeddedRedis | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until SIGINT/SIGTERM. Raises ConfigError/BusError for start-up problems."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        redis_url = await self._redis()
        try:
            parts = await self._build(redis_url)
            await self._serve(parts)
        finally:
            if self._embedded is not None:
                await self._embedded.stop()

    # ---- start-up ---------------------------------------------------------------------------

    async def _redis(self) -> str:
        """The Redis URL to use; starts an embedded redis-server for the demo when allowed."""
        url = self._config.redis.url
        if await reachable(url, self._config.redis.connect_timeout_s):
            return url
        shown = redact_url(url)
        if self._redis_url_explicit:
            raise BusError(f"Redis at {shown} is unreachable")
        if not EmbeddedRedis.available():
            raise BusError(
                f"Redis at {shown} is unreachable and redis-server is not installed "
                "(apt-get install redis-server, or pass --redis-url)"
            )
        self._embedded = EmbeddedRedis(state_dir())
        embedded_url = await self._embedded.start()
        log.warning("Redis at %s is unreachable: started a private one at %s", shown, embedded_url)
        return embedded_url

    async def _build(self, redis_url: str) -> _Parts:
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
        for stream in config.streams:
            bank.add_stream(stream.name)
        bank.restore_snapshots()  # says what it restored or moved aside, in the log
        redis_settings = config.redis.model_copy(update={"url": redis_url})
        replies = ReplyPublisher(redis_settings, config.query)
        engine = Engine(
            loaded,
            bank,
            replies,
            config.query,
            encode_batch_clips=config.model.encode_batch_clips,
            model_name=config.model.checkpoint,
        )
        gaps: dict[str, list[GapEvent]] = {s.name: [] for s in config.streams}

        def on_gap_recent(event: GapEvent) -> None:
            recent = gaps[event.stream]
            recent.append(event)
            del recent[:-_RECENT_GAPS]

        def on_gap(event: GapEvent) -> None:
            on_gap_recent(event)
            engine.record_gap(event)

        needs_whip = any(s.url.startswith("whip:") for s in config.streams)
        whip = WhipServer(config.ingest.whip) if needs_whip or config.ingest.whip.enabled else None
        ingests = [
            StreamIngest(
                stream,
                config.ingest,
                image_size=loaded.model.image_size,
                on_gap=on_gap,
                whip=whip,
            )
            for stream in config.streams
        ]
        for ingest in ingests:
            engine.add_source(ingest.settings.name, ingest.clips, ingest.settings.fps)
        await engine.on_device(engine.refresh_memory_stats)

        async def forget(request: ForgetRequest) -> None:
            if request.stream not in gaps:
                raise UnknownStream(f"unknown stream {request.stream!r}")
            await engine.forget(request.stream, request.since, request.until)
            on_gap_recent(GapEvent(request.stream, request.since, request.until, "forgotten"))

        intake = QueryIntake(
            redis_settings,
            config.query,
            submit=engine.submit,
            cancel=engine.cancel,
            forget=forget,
            replies=replies,
        )
        status = StatusPublisher(redis_settings, config.status)
        return _Parts(loaded, bank, engine, ingests, whip, intake, replies, status, gaps)

    # ---- running ----------------------------------------------------------------------------

    async def _serve(self, parts: _Parts) -> None:
        if parts.whip is not None:
            await parts.whip.start()
            log.info("WHIP ingest at %s", parts.whip.url)
        tasks: dict[str, asyncio.Task[Any]] = {}

        def spawn(name: str, coro: Coroutine[Any, Any, Any]) -> None:
            tasks[name] = asyncio.create_task(coro, name=name)

        for ingest in parts.ingests:
            spawn(f"ingest:{ingest.settings.name}", ingest.run())
        spawn("engine", parts.engine.run())
        spawn("intake", parts.intake.run())
        spawn("status", self._publish_status(parts))
        view = LiveView(lambda: self.status(parts)) if self._tui else None
        if view is not None:
            view.start()
        log.info("flashwatch is running: %d stream(s); Ctrl-C stops", len(parts.ingests))
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
        order = ["intake", *[n for n in tasks if n.startswith("ingest:")], "engine"]
        for name in order:
            await _cancel(tasks.pop(name))
        await self._snapshot(parts)
        for name in parts.bank.streams():
            view = parts.bank.view(name)
            if view.span is not None:
                log.info(
                    "memory %r at stop: %d tokens, span %.3f–%.3f",
                    name, view.tokens_held, view.span[0], view.span[1],
                )  # fmt: skip
        parts.engine.close()
        parts.bank.close()  # the snapshot writer thread, after what it has queued
        with contextlib.suppress(Exception):  # a last status is best effort
            await parts.status.publish(self.status(parts, state_override="stopped"))
        for task in tasks.values():
            await _cancel(task)
        if parts.whip is not None:
            await parts.whip.stop()
        await parts.replies.aclose()
        await parts.status.aclose()
        log.info("stopped")

    async def _publish_status(self, parts: _Parts) -> None:
        while True:
            try:
                await parts.status.publish(self.status(parts))
            except Exception:  # a bad snapshot must not stop the daemon; try again next time
                log.exception("building or publishing the status failed")
            await asyncio.sleep(self._config.status.publish_interval_s)

    async def _snapshot(self, parts: _Parts) -> None:
        """The last snapshot, on the device thread (periodic ones are engine maintenance).

        Never raises: a failed write is one warning and a counter in status (``memory``), and a
        clean stop still exits 0 when the disk is full.
        """
        try:
            await parts.engine.on_device(parts.bank.flush_snapshots)
        except Exception as exc:  # noqa: BLE001 - belt and braces: the bank counts its own
            log.warning("the final snapshot failed: %s", " ".join(str(exc).split()))

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
            streams.append(
                {
                    "name": stats.name,
                    "url": stats.url,
                    "state": state_override or stats.state.value,
                    "fps_in": stats.fps_in,
                    "fps_sampled": stats.fps_sampled,
                    "dropped": dropped,
                    "clips": stats.clips,
                    "reconnects": stats.reconnects,
                    "reconnects_last_hour": stats.reconnects_last_hour,
                    "stalls_last_hour": stats.stalls_last_hour,
                    "quality": stats.quality,
                    "last_error": stats.last_error,
                    "memory": memory_status(memory) if memory is not None else None,
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
                },
                "snapshots": dataclasses.asdict(parts.bank.snapshot_health()),
                "encoder": {
                    "clips_encoded": engine.clips_encoded,
                    "batches": engine.batches,
                    "lag_s": engine.lag_s,
                    "last_batch_ms": engine.last_batch_ms,
                },
            }
        )


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
    }


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
