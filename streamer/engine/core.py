"""The engine: schedule, execute, update.

- schedule: the pure :class:`~streamer.engine.scheduler.Scheduler` picks the next work item
  from the clip feeds, the job table, what memory holds and the clock;
- execute: the :class:`~streamer.engine.runner.Runner` runs it on the single device thread
  (model forward passes and memory changes never run on the event loop, never concurrently);
- update: the job table, the counters and the reply outbox (tokens, answers, errors).

With nothing to do the loop sleeps until work arrives (a clip, a query, a gap, a cancel) or
the nearest deadline passes; it never polls.

Failures: one query's failure fails that query only. A failed encode is counted by cause; a
stream whose clips keep failing is marked failed (its clips are dropped and counted), and a
device that keeps failing (``device_failure_limit`` failed steps in a row) stops the engine
with :class:`~streamer.engine.errors.EngineFailed`, which stops the daemon with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from memory.bank import MemoryBank, MemoryStats
from model.detok import IncrementalDetokenizer
from model.errors import FlashwatchError
from model.loader import LoadedModel
from sinks.settings import QuerySettings
from streamer.engine.answers import PrefillSummary, build_answer
from streamer.engine.errors import Busy, InvalidRequest, QueryCancelled, QueryError, QueryTimeout
from streamer.engine.feeds import ClipFeeds
from streamer.engine.health import EngineHealth
from streamer.engine.jobs import Job, JobTable
from streamer.engine.outbox import Replies, ReplyOutbox
from streamer.engine.planner import PlanLimits, QueryPlan
from streamer.engine.runner import EncodeOutcome, Generated, Runner, RunnerLimits
from streamer.engine.scheduler import (
    ApplyGaps,
    DecodeStep,
    EncodeBatch,
    Maintenance,
    MemoryState,
    PrefillChunk,
    Retire,
    Scheduler,
    SchedulerPolicy,
    ScoreBatch,
    StartJob,
    WorkItem,
    memory_ready,
)
from streamer.engine.settings import EngineSettings
from streamer.engine.stats import Counters, EngineStats, percentile
from streamer.engine.types import Answer, Query, ScoreRequest, Scores, Ticket
from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip, GapEvent

log = logging.getLogger(__name__)

T = TypeVar("T")
# While jobs are held (deadlines) or the memory has maintenance that another thread may make
# ready (a consolidation planned off the device, a snapshot falling due), an idle engine looks
# again at least this often; otherwise it sleeps until work arrives.
_IDLE_MAX_S = 1.0


@dataclass
class _Round:
    """A scoring round waiting or running: its request, its caller's future, device time."""

    request: ScoreRequest
    future: asyncio.Future[Scores]
    started: bool = False
    device_s: float = 0.0


@dataclass
class _Running:
    """Event-loop side of a started job: its plan and what its prefill said."""

    plan: QueryPlan
    summary: PrefillSummary | None = None


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        bank: MemoryBank,
        replies: Replies,
        query: QuerySettings,
        settings: EngineSettings | None = None,
        *,
        model_name: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings or EngineSettings()
        self._query = query
        self._loaded = loaded
        self._bank = bank
        self._model_name = model_name or loaded.fingerprint[:16]
        self._clock = clock
        self._outbox = ReplyOutbox(replies)
        self._feeds = ClipFeeds()
        self._jobs = JobTable()
        self._running: dict[int, _Running] = {}
        self._counters = Counters()
        self._sources_failed: set[str] = set()  # streams whose ingest failed for good
        self._rounds: dict[int, _Round] = {}  # scoring rounds, oldest first (bounded)
        self._round_ids = 0
        self._local: dict[str, asyncio.Future[Answer]] = {}  # in-process queries' answers
        self._wakeup = asyncio.Event()
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashwatch-device")
        model = loaded.model
        limits = PlanLimits(
            max_context_tokens=loaded.max_context_tokens,
            max_visual_tokens=loaded.max_frames * model.tokens_per_clip // model.frames_per_clip,
            tokens_per_frame=model.tokens_per_clip // model.frames_per_clip,
            reserve_new_tokens=query.max_new_tokens_limit,
            selection_grid_s=self._settings.selection_grid_s,
        )
        s = self._settings
        self._runner = Runner(
            loaded,
            bank,
            limits,
            RunnerLimits(
                slots=query.max_in_flight,
                chunk_tokens=s.prefill_chunk_tokens,
                prefix_cache_bytes=int(s.prefix_cache_mb * 2**20),
                slot_text_tokens=s.kv_slot_text_tokens,
                max_new_tokens=query.max_new_tokens_limit,
            ),
        )
        self._scheduler = Scheduler(
            SchedulerPolicy(
                encode_batch_clips=s.encode_batch_clips,
                max_in_flight=query.max_in_flight,
                decode_batch_max=s.decode_batch_max,
                prefill_chunk_tokens=s.prefill_chunk_tokens,
                query_share=s.query_share,
                evaluation_share=s.evaluation_share,
                maintenance_slice_s=s.maintenance_slice_s,
                maintenance_max_wait_s=s.maintenance_max_wait_s,
            )
        )
        self._health = EngineHealth(
            stream_failure_limit=s.stream_failure_limit,
            device_failure_limit=s.device_failure_limit,
        )

    # ---- wiring -------------------------------------------------------------------------

    @property
    def runner(self) -> Runner:
        return self._runner

    def add_source(self, name: str, clips: DropQueue[Clip], fps: float = 1.0) -> None:
        self._feeds.add(name, clips)
        self._runner.set_fps(name, fps)

    def source_failed(self, name: str) -> None:
        """The stream's source failed for good: queries stop waiting for its first memory."""
        self._sources_failed.add(name)
        self._wakeup.set()

    async def remove_source(self, name: str) -> None:
        """Stop feeding ``name`` (live reconfiguration); its memory stays in the bank."""
        self._feeds.remove(name)
        # on the device thread, after any batch already submitted that still reads its fps
        await self.on_device(self._runner.remove_stream, name)

    def record_gap(self, event: GapEvent) -> None:
        """An outage from ingest; it reaches memory after the clips queued before it."""
        self._feeds.record_gap(event)
        self._wakeup.set()

    async def forget(self, stream: str, start: float, end: float) -> None:
        """Remove ``[start, end)`` from a stream's memory (and its snapshot)."""
        await self.on_device(self._runner.forget, stream, start, end)

    def memory_stats(self, stream: str) -> MemoryStats | None:
        """The stream's memory statistics as of the last change (no lock, no device work)."""
        return self._runner.memory_stats.get(stream)

    def refresh_memory_stats(self) -> None:
        """Recompute every stream's statistics (device thread; e.g. after a restore)."""
        self._runner.refresh_stats()

    async def on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the device thread (the only thread that touches model and memory)."""
        return await asyncio.get_running_loop().run_in_executor(self._device, fn, *args)

    def room(self) -> int:
        """How many more durable requests the engine can hold now: the queue bound less the
        queries waiting (held ones included). The intake reads at most that many; durable
        requests are never refused ``busy`` (the request stream is the queue)."""
        return max(0, self._query.max_queued - self._jobs.queued)

    async def submit(self, ticket: Ticket) -> None:
        """Queue a query. A quick (non-durable) one raises Busy past the queue bound."""
        if not ticket.durable and self.room() <= 0:
            raise Busy(f"{self._jobs.queued} queries already queued; try again later")
        self._jobs.add(ticket, IncrementalDetokenizer(self._loaded.tokenizer))
        self._wakeup.set()

    async def score(self, request: ScoreRequest) -> Scores:
        """P(yes) of each question over one window (standing conditions), from one shared
        prefill of the window. Raises Busy past ``evaluation_max_queued`` rounds waiting,
        InvalidRequest for bad questions, and the planning errors of a query (UnknownStream,
        EmptyMemory)."""
        s = self._settings
        if not request.questions or len(request.questions) > s.evaluation_max_questions:
            raise InvalidRequest(
                f"a scoring round takes 1 to {s.evaluation_max_questions} questions, "
                f"got {len(request.questions)}"
            )
        limit = self._query.max_question_chars
        if any(not q.strip() or len(q) > limit for q in request.questions):
            raise InvalidRequest(f"each question needs 1 to {limit} characters")
        if len(self._rounds) >= s.evaluation_max_queued:
            raise Busy(f"{len(self._rounds)} scoring rounds already queued; try again later")
        self._round_ids += 1
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        self._rounds[self._round_ids] = _Round(request, future)
        self._wakeup.set()
        return await future

    async def generate(self, query: Query) -> Answer:
        """Answer a query in process (an alert's explanation, a summary): no reply is
        published; the answer (or the query's error) comes back here."""
        if query.id in self._local:
            raise InvalidRequest(f"query {query.id} is already running")
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._local[query.id] = future
        try:
            await self.submit(Ticket(query, None, self._clock()))
        except QueryError:
            del self._local[query.id]
            raise
        try:
            return await future
        finally:  # the caller gave up: the job leaves at the next scheduling, silently
            if not future.done():
                self.cancel(query.id)

    def cancel(self, request_id: str) -> None:
        """Mark a queued or in-flight query cancelled; it fails at the next scheduling."""
        for job in self._jobs.by_request(request_id):
            job.cancelled = True
        self._wakeup.set()

    def stats(self) -> EngineStats:
        c = self._counters
        memory = self._memory_state()
        runner = self._runner.stats()
        queued = [j for j in self._jobs if j.phase == "queued"]
        return EngineStats(
            clips_encoded=c.clips_encoded,
            batches=c.batches,
            last_batch_ms=c.last_batch_ms,
            lag_s=c.lag_s,
            refused=dict(c.refused),
            encode_failures=dict(self._health.encode_failures),
            failed_streams=dict(self._health.failed_streams),
            dropped_failed=dict(c.dropped_failed),
            state="failed" if self._health.failure is not None else "running",
            failure=self._health.failure,
            pending=len(queued),
            waiting_memory=sum(
                1 for j in queued if not memory_ready(j.ticket.request.stream, memory)
            ),
            in_flight=self._jobs.in_flight,
            completed=c.completed,
            failed=c.failed,
            latency_p50_s=percentile(c.latencies, 50),
            latency_p95_s=percentile(c.latencies, 95),
            ttft_p95_s=percentile(c.ttfts, 95),
            warm_up_s=c.warm_up_s,
            encode_ms_per_clip=1000.0 * c.encode_s / c.clips_encoded if c.clips_encoded else None,
            prefix_hits=runner.prefix_hits,
            prefix_misses=runner.prefix_misses,
            kv_slots_free=runner.kv_slots_free,
        )

    def close(self) -> None:
        self._device.shutdown(wait=True, cancel_futures=True)

    # ---- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Schedule, execute, update; until cancelled (or the device fails: EngineFailed).

        On cancellation (or failure), durable requests still queued or in flight are left
        pending in Redis (not acknowledged), so the next start answers them; quick (pub/sub)
        ones fail. Replies
        are published by the outbox's own task, so a slow Redis never stalls this loop.
        """
        publisher = asyncio.ensure_future(self._outbox.run())
        try:
            await self.on_device(self._runner.refresh_stats)
            if self._settings.warm_up and self._counters.warm_up_s is None:
                self._counters.warm_up_s = await self.on_device(self._runner.warm_up)
            while True:
                now = self._clock()
                item = self._scheduler.schedule(
                    self._feeds, self._jobs.views(), self._memory_state(), now, tuple(self._rounds)
                )
                if item is None:
                    await self._idle()
                    continue
                started = time.perf_counter()
                await self._execute(item)
                self._scheduler.account(item, time.perf_counter() - started, self._clock())
        finally:
            for job in self._jobs:
                self._jobs.remove(job.id)
                failure = self._health.failure
                if job.ticket.durable:  # also when the device failed: a restart answers it
                    log.info("query %s left pending for the next start", job.request_id)
                else:
                    self._fail(job, QueryCancelled(failure or "the daemon is shutting down"))
            self._running.clear()
            for shared in self._rounds.values():
                if not shared.future.done():
                    shared.future.set_exception(QueryCancelled("the daemon is shutting down"))
            self._rounds.clear()
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            await asyncio.shield(self._outbox.flush())

    async def _idle(self) -> None:
        """Sleep until work arrives: a clip, a submit/cancel/gap, or the nearest deadline.

        A timer sets the event rather than ``asyncio.wait_for``, which on Python 3.11 can
        swallow a cancellation that arrives just as the wait ends (the loop would not stop).
        """
        self._wakeup.clear()
        loop = asyncio.get_running_loop()
        deadline = self._scheduler.next_deadline(self._jobs.views())
        delay = None if deadline is None else max(0.0, deadline - self._clock()) + 1e-3
        # at least once a second: maintenance falls due with time (the snapshot interval)
        delay = _IDLE_MAX_S if delay is None else min(_IDLE_MAX_S, delay)
        timer = loop.call_later(delay, self._wakeup.set)
        waiters = [
            asyncio.ensure_future(self._wakeup.wait()),
            asyncio.ensure_future(self._feeds.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if timer is not None:
                timer.cancel()
            for waiter in waiters:
                waiter.cancel()
            for waiter in waiters:
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    def _memory_state(self) -> MemoryState:
        stats = self._runner.memory_stats
        return MemoryState(
            known=frozenset(stats),
            with_tokens=frozenset(name for name, s in stats.items() if s.tokens > 0),
            failed=frozenset(self._health.failed_streams) | self._sources_failed,
            maintenance_due=self._runner.maintenance_due(),
        )

    # ---- execute and update ---------------------------------------------------------------

    async def _execute(self, item: WorkItem) -> None:
        match item:
            case Retire():
                self._retire(item)
            case ApplyGaps():
                await self.on_device(self._runner.apply_gaps, item.gaps)
            case EncodeBatch():
                await self._encode(item)
            case StartJob():
                await self._start(item.job_id)
            case PrefillChunk():
                await self._prefill(item)
            case DecodeStep():
                await self._decode(item)
            case ScoreBatch():
                await self._score(item.round_id)
            case Maintenance():
                await self._device_call(self._runner.maintenance, item.budget_s)

    def _retire(self, item: Retire) -> None:
        for job_id in item.cancelled:
            if (job := self._drop(job_id)) is not None:
                self._fail(job, QueryCancelled("cancelled by the client"))
        for job_id in item.expired:
            if (job := self._drop(job_id)) is not None:
                deadline = job.ticket.request.deadline_s
                waited = " waiting for its streams' first memory" if job.phase == "queued" else ""
                self._fail(job, QueryTimeout(f"deadline of {deadline:g} s passed{waited}"))

    async def _encode(self, item: EncodeBatch) -> None:
        failed = self._health.failed_streams
        clips = [clip for clip in item.clips if clip.stream not in failed]
        for clip in item.clips:
            if clip.stream in failed:
                self._counters.dropped_failed[clip.stream] += 1
        if not clips:
            return
        started = time.perf_counter()
        outcome = await self._device_call(self._runner.encode, clips)
        if outcome is None:
            return
        elapsed = time.perf_counter() - started
        self._count_encode(clips, outcome, elapsed)

    def _count_encode(self, clips: list[Clip], outcome: EncodeOutcome, elapsed: float) -> None:
        c = self._counters
        encoded = sum(outcome.encoded.values())
        done = encoded + sum(outcome.refused.values()) + sum(outcome.static.values())
        c.refused.update(outcome.refused)
        for failure in outcome.failures:
            if self._health.clip_failed(failure.stream, failure.cause, failure.message):
                self._counters.dropped_failed[failure.stream] += self._feeds.drop_stream(
                    failure.stream
                )
        for name in {*outcome.encoded, *outcome.refused, *outcome.static}:
            self._health.stream_ok(name)
        if done and not encoded and not outcome.failures:
            return  # only static spans recorded (motion gating): no encoder work to count
        if done:
            self._health.device_ok()
            c.batches += 1
            c.clips_encoded += encoded
            c.encode_s += elapsed
            c.last_batch_ms = elapsed * 1000.0
            oldest = min(clip.end for clip in clips)
            if oldest > 1e9:  # wall-clock (live) sources only: how late the latest clip encoded
                c.lag_s = max(0.0, self._clock() - oldest)
        else:
            self._health.device_failed(f"encoding failed: {outcome.failures[0].message}")

    async def _start(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        try:
            started = await self.on_device(self._runner.start, job.id, job.ticket.request)
        except Exception as exc:  # noqa: BLE001 (one query's failure must not stop the engine)
            self._fail_job(job, exc, "planning")
            return
        self._running[job.id] = _Running(started.plan)
        job.phase, job.prefill_left = "prefill", started.prompt_tokens

    async def _prefill(self, item: PrefillChunk) -> None:
        job = self._jobs.get(item.job_id)
        if job is None:
            return
        try:
            result = await self.on_device(self._runner.prefill, job.id, item.max_tokens)
        except Exception as exc:  # noqa: BLE001 (a stage boundary: counted, escalated)
            self._fail_job(job, exc, "prefill")
            return
        self._health.device_ok()
        if result.first is None:
            return
        job.first_token_at = self._clock()
        self._running[job.id].summary = result.summary
        job.phase = "decode"
        self._accept(job, result.first)

    async def _decode(self, item: DecodeStep) -> None:
        jobs = [job for job_id in item.job_ids if (job := self._jobs.get(job_id)) is not None]
        try:
            results = await self.on_device(self._runner.decode, [job.id for job in jobs])
        except Exception as exc:  # noqa: BLE001 (a stage boundary: counted, escalated)
            for job in jobs:
                self._fail_job(job, exc, "decode")
            return
        self._health.device_ok()
        for job in jobs:
            self._accept(job, results[job.id])

    async def _score(self, round_id: int) -> None:
        shared = self._rounds.get(round_id)
        if shared is None:
            return
        if shared.future.done():  # the caller went away
            self._end_round(round_id)
            return
        started = time.perf_counter()
        try:
            if not shared.started:
                await self.on_device(self._runner.score_start, round_id, shared.request)
                shared.started = True
                result = None
            else:
                result = await self.on_device(self._runner.score_step, round_id)
        except Exception as exc:  # noqa: BLE001 (one round's failure must not stop the engine)
            self._end_round(round_id)
            if not isinstance(exc, FlashwatchError):
                log.warning("scoring failed: %s: %s", type(exc).__name__, exc)
                self._health.device_failed(f"scoring failed: {type(exc).__name__}: {exc}")
            error = exc if isinstance(exc, QueryError) else _internal(exc)
            if not shared.future.done():
                shared.future.set_exception(error)
            return
        shared.device_s += time.perf_counter() - started
        if result is None:
            return
        plan, hit = await self.on_device(self._runner.score_plan, round_id)
        self._end_round(round_id)
        if not shared.future.done():
            shared.future.set_result(
                Scores(result, plan.history, plan.frames, hit, shared.device_s)
            )

    def _end_round(self, round_id: int) -> None:
        self._rounds.pop(round_id, None)
        with contextlib.suppress(RuntimeError):  # the executor is shut down: nothing to free
            self._device.submit(self._runner.score_release, round_id)

    def _accept(self, job: Job, generated: Generated) -> None:
        if generated.token is not None:
            job.tokens.append(generated.token)
            self._emit(job, job.detok.push(generated.token))
        if generated.finished:
            self._emit(job, job.detok.flush())
            self._finish(job)

    def _emit(self, job: Job, piece: str) -> None:
        if piece and job.request_id not in self._local:
            self._outbox.token(job.request_id, job.emitted, piece)
            job.emitted += 1

    def _finish(self, job: Job) -> None:
        running = self._running.get(job.id)
        self._drop(job.id)
        if running is None:
            return
        try:
            answer = build_answer(
                job.ticket,
                running.plan,
                running.summary,
                text=job.detok.text,
                tokens=len(job.tokens),
                first_token_at=job.first_token_at,
                now=self._clock(),
                model_name=self._model_name,
            )
        except Exception as exc:  # e.g. an inconsistent plan: fail this answer only
            log.exception("building the answer of %s failed", job.request_id)
            self._fail(job, _internal(exc))
            return
        self._counters.completed += 1
        self._counters.latencies.append(answer.latency_s)
        if answer.ttft_s is not None:
            self._counters.ttfts.append(answer.ttft_s)
        local = self._local.pop(job.request_id, None)
        if local is not None:
            if not local.done():
                local.set_result(answer)
            return
        self._outbox.finish(job.ticket, answer)

    def _fail_job(self, job: Job, exc: Exception, stage: str) -> None:
        """A job's device step failed: fail the job; a device error counts toward escalation."""
        self._drop(job.id)
        if isinstance(exc, QueryError):
            self._fail(job, exc)
            return
        if not isinstance(exc, FlashwatchError):
            log.warning("query %s failed in %s: %s: %s", job.request_id, stage,
                        type(exc).__name__, exc)  # fmt: skip
            self._health.device_failed(f"{stage} failed: {type(exc).__name__}: {exc}")
        self._fail(job, _internal(exc))

    def _drop(self, job_id: int) -> Job | None:
        """Remove a job from the table and its sequence from the device."""
        job = self._jobs.remove(job_id)
        self._running.pop(job_id, None)
        if job is not None:
            # On the device thread (the KV pool is the runner's), after the job's last step.
            with contextlib.suppress(RuntimeError):  # the executor is shut down: nothing to free
                self._device.submit(self._runner.release, job_id)
        return job

    def _fail(self, job: Job, error: QueryError) -> None:
        self._counters.failed += 1
        log.info("query %s failed: %s (%s)", job.request_id, error.code, error)
        local = self._local.pop(job.request_id, None)
        if local is not None:
            if not local.done():
                local.set_exception(error)
            return
        self._outbox.fail(job.ticket, error)

    # ---- device failures ------------------------------------------------------------------

    async def _device_call(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Device work that is nobody's query (maintenance, encode): failures are counted."""
        try:
            result = await self.on_device(fn, *args)
        except Exception as exc:  # noqa: BLE001 (a stage boundary: counted, escalated)
            log.warning("%s failed: %s: %s", getattr(fn, "__name__", "device work"),
                        type(exc).__name__, exc)  # fmt: skip
            self._health.device_failed(f"{type(exc).__name__}: {exc}")
            return None
        return result


def _internal(exc: BaseException) -> QueryError:
    error = QueryError(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
