"""The engine: one runner owns the device; a scheduler interleaves its work.

Every loop iteration reads "schedule, execute, update":

- schedule: if clips are waiting, the next work is an encode batch (round-robin across streams,
  at most ``encode_batch_clips``); otherwise one step of one in-flight query (its prefill, or
  one decode step), or starting the next queued query.
- execute: on the single device thread (model forward passes and memory mutations never run on
  the event loop and never run concurrently).
- update: publish tokens, finish answers, count.

Encoding goes first whenever clips wait, and a query advances one decode step at a time, so a
long answer never makes ingest fall behind real time (a prefill is the one long step; it runs
between encode batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from memory.bank import MemoryBank, MemoryStats
from model.errors import (
    Busy,
    FlashwatchError,
    MemoryStoreError,
    QueryCancelled,
    QueryError,
    QueryTimeout,
)
from model.generation import GenerationSession, SamplingParams
from model.loader import LoadedModel
from model.preprocess import preprocess_frames
from model.prompt import stop_token_ids
from sinks.schema import Answer, QueryRequest, QueryTicket
from sinks.settings import QuerySettings
from streamer.engine.feeds import ClipFeeds
from streamer.engine.outbox import Replies, ReplyOutbox
from streamer.engine.planner import PlanLimits, QueryPlan, plan_query, resolve_streams
from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip, GapEvent

log = logging.getLogger(__name__)

T = TypeVar("T")
_IDLE_POLL_S = 0.02
# Device time given to memory maintenance (snapshot copies) between steps, per loop turn.
_MAINTENANCE_SLICE_S = 0.01
_TRAINED_MAX_FRAMES = 512  # VideoChat-Flash's trained regime: up to 512 frames of 16 tokens


@dataclass(frozen=True, slots=True)
class EngineStats:
    clips_encoded: int
    batches: int
    last_batch_ms: float
    lag_s: float  # how late (vs the wall clock) the oldest clip of the last batch was encoded
    refused: dict[str, int]  # clips the memory refused (not newer than it), by stream
    pending: int
    in_flight: int
    completed: int
    failed: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_p95_s: float | None


@dataclass
class _Job:
    ticket: QueryTicket
    plan: QueryPlan | None = None
    session: GenerationSession | None = None
    first_token_at: float | None = None
    text: str = ""
    emitted_tokens: int = 0
    cancelled: bool = False

    @property
    def request(self) -> QueryRequest:
        return self.ticket.request


@dataclass
class _Counters:
    clips_encoded: int = 0
    batches: int = 0
    last_batch_ms: float = 0.0
    lag_s: float = 0.0
    completed: int = 0
    failed: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # clips the memory refused, by stream
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    ttfts: deque[float] = field(default_factory=lambda: deque(maxlen=256))


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        bank: MemoryBank,
        replies: Replies,
        settings: QuerySettings,
        *,
        encode_batch_clips: int,
        model_name: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._loaded = loaded
        self._encode_batch_clips = encode_batch_clips
        self._model_name = model_name or loaded.fingerprint[:16]
        self._bank = bank
        self._outbox = ReplyOutbox(replies)
        self._settings = settings
        self._clock = clock
        self._feeds = ClipFeeds()
        self._fps: dict[str, float] = {}
        self._memory_stats: dict[str, MemoryStats] = {}  # published by the device thread
        self._queued: deque[_Job] = deque()
        self._active: deque[_Job] = deque()
        self._counters = _Counters()
        self._wakeup = asyncio.Event()
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashwatch-device")
        model = loaded.model
        self._limits = PlanLimits(
            max_context_tokens=loaded.max_context_tokens,
            max_visual_tokens=_TRAINED_MAX_FRAMES * model.tokens_per_clip // model.frames_per_clip,
            tokens_per_frame=model.tokens_per_clip // model.frames_per_clip,
            reserve_new_tokens=settings.max_new_tokens_limit,
        )
        self._stop_ids = stop_token_ids(loaded.tokenizer)

    # ---- wiring -------------------------------------------------------------------------

    def add_source(self, name: str, clips: DropQueue[Clip], fps: float = 1.0) -> None:
        self._feeds.add(name, clips)
        self._fps[name] = fps

    def record_gap(self, event: GapEvent) -> None:
        """An outage from ingest; it reaches memory after the clips queued before it."""
        self._feeds.record_gap(event)
        self._wakeup.set()

    async def forget(self, stream: str, start: float, end: float) -> None:
        """Remove ``[start, end)`` from a stream's memory (and its snapshot)."""
        await self.on_device(self._forget_on_device, stream, start, end)

    def memory_stats(self, stream: str) -> MemoryStats | None:
        """The stream's memory statistics as of the last change (no lock, no device work)."""
        return self._memory_stats.get(stream)

    def refresh_memory_stats(self) -> None:
        """Recompute every stream's statistics (device thread; e.g. after a restore)."""
        for name in self._fps:
            self._memory_stats[name] = self._bank.stats(name, self._fps[name])

    async def on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the device thread (the only thread that touches model and memory)."""
        return await asyncio.get_running_loop().run_in_executor(self._device, fn, *args)

    async def submit(self, ticket: QueryTicket) -> None:
        """Queue a query; raises Busy past the queue bound."""
        if len(self._queued) >= self._settings.max_queued:
            raise Busy(f"{len(self._queued)} queries already queued; try again later")
        self._queued.append(_Job(ticket))
        self._wakeup.set()

    def cancel(self, request_id: str) -> None:
        """Mark a queued or in-flight query cancelled; it fails at its next step."""
        for job in (*self._queued, *self._active):
            if job.request.id == request_id:
                job.cancelled = True

    def stats(self) -> EngineStats:
        c = self._counters
        return EngineStats(
            clips_encoded=c.clips_encoded,
            batches=c.batches,
            last_batch_ms=c.last_batch_ms,
            lag_s=c.lag_s,
            refused=dict(c.refused),
            pending=len(self._queued),
            in_flight=len(self._active),
            completed=c.completed,
            failed=c.failed,
            latency_p50_s=_percentile(c.latencies, 50),
            latency_p95_s=_percentile(c.latencies, 95),
            ttft_p95_s=_percentile(c.ttfts, 95),
        )

    def close(self) -> None:
        self._device.shutdown(wait=True, cancel_futures=True)

    # ---- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Schedule, execute, update; until cancelled.

        On cancellation, durable requests still queued or in flight are left pending in Redis
        (not acknowledged), so the next start answers them; quick (pub/sub) ones fail. Replies
        are published by the outbox's own task, so a slow Redis never stalls this loop.
        """
        publisher = asyncio.ensure_future(self._outbox.run())
        try:
            while True:
                clips = self._feeds.take(self._encode_batch_clips)
                encode_s = await self._encode(clips) if clips else 0.0
                gaps = self._feeds.due_gaps()
                if gaps:
                    await self.on_device(self._apply_gaps, gaps)
                while self._queued and len(self._active) < self._settings.max_in_flight:
                    await self._start(self._queued.popleft())  # planning is ~1 ms
                # Queries get at least as much device time as the encode batch just took (one
                # step when nothing was encoded), so answers progress even when ingest never
                # lets up, and encoding still comes back after every slice.
                slice_end = time.perf_counter() + encode_s
                while self._active:
                    await self._advance(self._active[0])
                    if time.perf_counter() >= slice_end:
                        break
                maintenance = self._bank.maintenance_due()
                if maintenance:
                    await self.on_device(self._bank.run_maintenance, _MAINTENANCE_SLICE_S)
                if not clips and not self._active and not maintenance:
                    await self._idle()
        finally:
            for job in (*self._active, *self._queued):
                if job.ticket.entry_id is None:
                    self._fail(job, QueryCancelled("the daemon is shutting down"))
                else:
                    log.info("query %s left pending for the next start", job.request.id)
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            await asyncio.shield(self._outbox.flush())

    async def _idle(self) -> None:
        """Sleep until a query or gap arrives or the clip poll interval passes.

        A timer sets the event rather than ``asyncio.wait_for``, which on Python 3.11 can
        swallow a cancellation that arrives just as the wait ends (the loop would not stop).
        """
        timer = asyncio.get_running_loop().call_later(_IDLE_POLL_S, self._wakeup.set)
        try:
            await self._wakeup.wait()
        finally:
            timer.cancel()
        self._wakeup.clear()

    # ---- encoding -------------------------------------------------------------------------

    async def _encode(self, clips: list[Clip]) -> float:
        """Encode a batch into memory; returns the seconds it took."""
        started = time.perf_counter()
        try:
            await self.on_device(self._encode_on_device, clips)
        except Exception:  # e.g. out of memory: skip this batch, keep the engine running
            log.exception("encoding %d clips failed; they are dropped", len(clips))
            return time.perf_counter() - started
        elapsed = time.perf_counter() - started
        c = self._counters
        c.batches += 1
        c.clips_encoded += len(clips)
        c.last_batch_ms = elapsed * 1000.0
        oldest = min(clip.end for clip in clips)
        if oldest > 1e9:  # wall-clock (live) sources only: how late the latest clip encoded
            c.lag_s = max(0.0, self._clock() - oldest)
        return elapsed

    def _encode_on_device(self, clips: list[Clip]) -> None:
        model = self._loaded.model
        size = model.image_size
        frames = np.stack([clip.frames for clip in clips])  # [B, 4, S, S, 3] uint8
        batch = preprocess_frames(frames.reshape(-1, *frames.shape[2:]), size)  # [B*4, 3, S, S]
        batch = batch.view(len(clips), -1, 3, size, size)
        batch = batch.to(device=self._loaded.device, dtype=self._loaded.dtype)
        with torch.inference_mode():
            tokens = model.encode_clips(batch)  # [B, 64, H]
        for clip, clip_tokens in zip(clips, tokens, strict=True):
            try:
                self._bank.append_clip(clip.stream, clip_tokens, clip.start, clip.end)
            except MemoryStoreError as exc:  # e.g. a file restarted behind restored memory
                refused = self._counters.refused
                refused[clip.stream] = refused.get(clip.stream, 0) + 1
                if refused[clip.stream] == 1:
                    log.warning("memory refused a clip (counted from now on): %s", exc)
        for name in {clip.stream for clip in clips}:
            self._memory_stats[name] = self._bank.stats(name, self._fps[name])

    def _apply_gaps(self, gaps: list[GapEvent]) -> None:
        for gap in gaps:
            try:
                self._bank.add_gap(gap.stream, gap.start, gap.end, gap.reason)
            except MemoryStoreError as exc:
                log.warning("memory refused a gap of %s: %s", gap.stream, exc)
            self._memory_stats[gap.stream] = self._bank.stats(gap.stream, self._fps[gap.stream])

    def _forget_on_device(self, stream: str, start: float, end: float) -> None:
        self._bank.forget(stream, start, end)
        self._memory_stats[stream] = self._bank.stats(stream, self._fps[stream])

    # ---- queries --------------------------------------------------------------------------

    async def _start(self, job: _Job) -> None:
        if self._stopped(job):
            return
        try:
            await self.on_device(self._plan_on_device, job)
        except QueryError as exc:
            self._fail(job, exc)
            return
        except Exception as exc:  # one query's failure must not stop the engine
            log.exception("planning query %s failed", job.request.id)
            self._fail(job, _internal(exc))
            return
        self._active.append(job)

    def _plan_on_device(self, job: _Job) -> None:
        request = job.request
        names = resolve_streams(request.stream, self._bank.streams())
        views = {name: self._bank.view(name) for name in names}
        job.plan = plan_query(
            request.question,
            list(views.values()),
            self._loaded.tokenizer,
            self._limits,
            since=request.since,
            until=request.until,
        )
        model = self._loaded.model
        visual = torch.cat(
            [self._bank.view(part.stream).tokens(part.segments) for part in job.plan.parts]
        ).to(device=self._loaded.device, dtype=self._loaded.dtype)
        inputs_embeds, visual_start = model.splice(list(job.plan.input_ids), visual)
        job.session = GenerationSession(
            model.llm,
            inputs_embeds,
            visual_start=visual_start,
            visual_len=visual.shape[0],
            drop=self._loaded.drop,
            sampling=SamplingParams(
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
            ),
            stop_ids=self._stop_ids,
        )

    async def _advance(self, job: _Job) -> None:
        """One prefill or one decode step of ``job``; finish it when done."""
        self._active.rotate(-1)  # round-robin between in-flight queries
        if self._stopped(job):
            self._active.remove(job)
            return
        session = job.session
        assert session is not None
        try:
            if session.prefill_output is None:
                await self.on_device(_inference, session.prefill)
                job.first_token_at = self._clock()
            else:
                await self.on_device(_inference, session.step)
        except Exception as exc:  # OOM and friends fail this query only
            if not isinstance(exc, FlashwatchError):
                log.exception("query %s failed on the device", job.request.id)
            self._active.remove(job)
            self._fail(job, exc if isinstance(exc, QueryError) else _internal(exc))
            return
        self._emit_text(job)
        if session.done:
            self._active.remove(job)
            try:
                self._finish(job)
            except Exception as exc:  # e.g. an answer that fails validation
                log.exception("finishing query %s failed", job.request.id)
                self._fail(job, _internal(exc))

    def _emit_text(self, job: _Job) -> None:
        """Publish the text the new tokens added (held back while a character is incomplete)."""
        assert job.session is not None
        text = self._loaded.tokenizer.decode(job.session.new_tokens)
        if text.endswith("\ufffd") and not job.session.done:
            return
        if len(text) > len(job.text) and text.startswith(job.text):
            self._outbox.token(job.request.id, job.emitted_tokens, text[len(job.text) :])
            job.emitted_tokens += 1
        job.text = text

    def _stopped(self, job: _Job) -> bool:
        """True (and the job failed) if it was cancelled or ran past its deadline."""
        if job.cancelled:
            self._fail(job, QueryCancelled("cancelled by the client"))
            return True
        if self._clock() > job.ticket.deadline_at:
            self._fail(job, QueryTimeout(f"deadline of {job.request.deadline_s:g} s passed"))
            return True
        return False

    def _finish(self, job: _Job) -> None:
        assert job.plan is not None and job.session is not None
        now = self._clock()
        answer = build_answer(job, self._model_name, now)
        self._counters.completed += 1
        self._counters.latencies.append(answer.latency_s)
        if answer.ttft_s is not None:
            self._counters.ttfts.append(answer.ttft_s)
        self._outbox.finish(job.ticket, answer)

    def _fail(self, job: _Job, error: QueryError) -> None:
        self._counters.failed += 1
        log.info("query %s failed: %s (%s)", job.request.id, error.code, error)
        self._outbox.fail(job.ticket, error)


def build_answer(job: _Job, model_name: str, now: float) -> Answer:
    """The final answer: text, evidence spans, attended spans ranked by attention mass."""
    plan, session = job.plan, job.session
    assert plan is not None and session is not None
    evidence = [
        {"stream": part.stream, "start": seg.start, "end": seg.end}
        for part in plan.parts
        for seg in part.segments
    ]
    evidence.sort(key=lambda span: (span["start"], str(span["stream"])))
    gaps = [
        {"stream": part.stream, "start": gap.start, "end": gap.end, "reason": gap.reason or "gap"}
        for part in plan.parts
        for gap in part.gaps
    ]
    return Answer(
        id=job.request.id,
        stream=[part.stream for part in plan.parts],
        question=job.request.question,
        answer=job.text,
        evidence=evidence,
        attended=attended_spans(plan, session),
        frames=plan.frames,
        history={"start": plan.history[0], "end": plan.history[1]},
        gaps=gaps,
        latency_s=max(0.0, now - job.ticket.received_at),
        ttft_s=None
        if job.first_token_at is None
        else max(0.0, job.first_token_at - job.ticket.received_at),
        tokens=len(session.new_tokens),
        model=model_name,
    )


def attended_spans(plan: QueryPlan, session: GenerationSession) -> list[dict[str, Any]]:
    """Segments whose tokens survived dropping, ranked by the attention mass they received."""
    out = session.prefill_output
    if out is None:
        return []
    owners = plan.owner_of()
    kept = out.kept_visual.tolist()
    masses = (
        out.visual_attention.tolist() if out.visual_attention is not None else [0.0] * len(kept)
    )
    totals: dict[tuple[str, float, float], float] = {}
    for index, mass in zip(kept, masses, strict=True):
        stream, segment = owners[index]
        key = (stream, segment.start, segment.end)
        totals[key] = totals.get(key, 0.0) + float(mass)
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return [{"stream": s, "start": a, "end": b, "mass": m} for (s, a, b), m in ranked]


def _inference(fn: Callable[[], T]) -> T:
    with torch.inference_mode():
        return fn()


def _internal(exc: BaseException) -> QueryError:
    error = QueryError(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _percentile(values: deque[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.fromiter(values, dtype=float), q))
