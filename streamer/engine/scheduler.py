"""The scheduler: decides what the device does next. Pure: no model, no tensors, no I/O.

Inputs are the clip feeds, a snapshot of the job table (``JobView``), what memory holds, and
the clock; the output is one frozen work item at a time, which the engine's runner executes.
The engine reports back how long each item took (``account``), which is all the state the
policy keeps besides round-robin positions.

Policy:

- **Retire first**: cancelled jobs and jobs past their deadline leave at once, in any phase.
- **Gaps** are applied as soon as they are due (their older clips are taken), so a clip after
  an outage never reaches memory before the outage does.
- **The encoder is never starved**: while clips wait, queries get device time only as credit
  earned by the last encode batch (``query_share`` of the device: with 0.5, as long as the
  batch took), then encoding comes back. Query items are bounded (one prefill chunk, one
  decode step), so encoding waits at most one item past the credit.
- **Queries**: a queued job starts (is planned) while fewer than ``max_in_flight`` run, but
  only once one of its streams holds memory (a stream that is starting or was just restored
  is waited for until the job's own deadline). In-flight work alternates between one
  **batched decode step** over every decoding job (up to ``decode_batch_max``, rotating when
  more) and one **prefill chunk** (at most ``prefill_chunk_tokens``) of the oldest
  prefilling job, so a long prefill neither waits behind answers nor stalls them.
- **Evaluation** (standing conditions: ``ScoreBatch``, one chunk of a scoring round, FIFO)
  is its own work class: while clips wait it runs only on credit earned by the last encode
  batch at ``evaluation_share`` of the device (0.2: a quarter of the batch's time), so the
  encoder keeps the rest; with no clips waiting it shares the device with queries, taking
  ``evaluation_share`` of the time both use while both have work.
- **Maintenance** (memory consolidation slices) runs when nothing else waits, or once it has
  waited ``maintenance_max_wait_s`` under load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from streamer.engine.feeds import ClipFeeds
from streamer.engine.types import ALL_STREAMS
from streamer.ingest.types import Clip, GapEvent

Phase = Literal["queued", "prefill", "decode"]


@dataclass(frozen=True, slots=True)
class SchedulerPolicy:
    encode_batch_clips: int = 8
    max_in_flight: int = 4
    decode_batch_max: int = 8
    prefill_chunk_tokens: int = 2048
    query_share: float = 0.5  # of device time while clips wait, in (0, 1)
    evaluation_share: float = 0.2  # of device time for standing-query scoring, in (0, 1)
    maintenance_slice_s: float = 0.05
    maintenance_max_wait_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 < self.query_share < 1.0:
            raise ValueError(f"query_share must be in (0, 1), got {self.query_share}")
        if not 0.0 < self.evaluation_share < 1.0:
            raise ValueError(f"evaluation_share must be in (0, 1), got {self.evaluation_share}")
        if min(self.encode_batch_clips, self.max_in_flight, self.decode_batch_max) < 1:
            raise ValueError("batch sizes and max_in_flight must be >= 1")
        if self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1")


@dataclass(frozen=True, slots=True)
class JobView:
    """What the scheduler knows of one job."""

    id: int
    phase: Phase
    streams: tuple[str, ...]
    deadline_at: float
    cancelled: bool = False
    prefill_left: int = 0  # prompt tokens not yet prefilled (phase "prefill")


@dataclass(frozen=True, slots=True)
class MemoryState:
    known: frozenset[str]  # streams the memory has
    with_tokens: frozenset[str]  # streams holding at least one token
    failed: frozenset[str] = frozenset()  # streams that will get no more memory (failed)
    maintenance_due: bool = False


# ---- work items ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retire:
    """Jobs that leave without device work: cancelled or past their deadline."""

    cancelled: tuple[int, ...]
    expired: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ApplyGaps:
    gaps: tuple[GapEvent, ...]


@dataclass(frozen=True, slots=True)
class EncodeBatch:
    clips: tuple[Clip, ...]


@dataclass(frozen=True, slots=True)
class StartJob:
    """Plan the job on the device (select memory, build the prompt, set up its sequence)."""

    job_id: int


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    job_id: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class DecodeStep:
    """One new token for each of these jobs, in one batched forward pass."""

    job_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ScoreBatch:
    """One step of a scoring round (planning, or one prefill chunk of its questions)."""

    round_id: int


@dataclass(frozen=True, slots=True)
class Maintenance:
    budget_s: float


WorkItem = (
    Retire
    | ApplyGaps
    | EncodeBatch
    | StartJob
    | PrefillChunk
    | DecodeStep
    | ScoreBatch
    | Maintenance
)
QUERY_WORK = (StartJob, PrefillChunk, DecodeStep)


def memory_ready(streams: tuple[str, ...], memory: MemoryState) -> bool:
    """Whether a queued job may start: one of its streams holds tokens, or planning will fail
    at once anyway (an unknown stream; no stream at all; streams that failed, so waiting for
    their memory is pointless)."""
    if streams == (ALL_STREAMS,):
        return not memory.known or bool(memory.with_tokens) or memory.known <= memory.failed
    if any(name not in memory.known for name in streams):
        return True  # unknown_stream, answered at once
    return any(name in memory.with_tokens for name in streams) or all(
        name in memory.failed for name in streams
    )


class Scheduler:
    def __init__(self, policy: SchedulerPolicy) -> None:
        self.policy = policy
        self._query_credit_s = 0.0  # device time queries may still take while clips wait
        self._decode_next = True  # alternation between decode steps and prefill chunks
        self._decode_cursor = 0  # rotation when more jobs decode than one batch holds
        self._maintenance_waiting_since: float | None = None
        self._eval_credit_s = 0.0  # device time evaluation may still take while clips wait
        self._eval_used_s = 0.0  # while queries and evaluation both have work: time each took
        self._query_used_s = 0.0

    def schedule(
        self,
        feeds: ClipFeeds,
        jobs: Sequence[JobView],
        memory: MemoryState,
        now: float,
        rounds: Sequence[int] = (),
    ) -> WorkItem | None:
        """The next item to execute, or None when there is nothing to do. ``rounds``: the
        scoring rounds waiting, oldest first."""
        cancelled = tuple(j.id for j in jobs if j.cancelled)
        expired = tuple(j.id for j in jobs if not j.cancelled and now > j.deadline_at)
        if cancelled or expired:
            return Retire(cancelled, expired)
        gaps = feeds.due_gaps()
        if gaps:
            return ApplyGaps(tuple(gaps))
        if self._maintenance_overdue(memory, now):
            return Maintenance(self.policy.maintenance_slice_s)
        clips_waiting = feeds.waiting()
        if not clips_waiting:
            self._query_credit_s = 0.0  # credit is never banked for later
            self._eval_credit_s = 0.0
        query = self._query_work(jobs, memory)
        score = ScoreBatch(rounds[0]) if rounds else None
        if query is None or score is None:
            self._eval_used_s = self._query_used_s = 0.0  # shares count while both have work
        if clips_waiting:
            if query is not None and self._query_credit_s > 0.0:
                return query
            if score is not None and self._eval_credit_s > 0.0:
                return score
            clips = feeds.take(self.policy.encode_batch_clips)
            if clips:
                return EncodeBatch(tuple(clips))
        if query is not None and score is not None:
            share = self.policy.evaluation_share
            behind = self._eval_used_s * (1.0 - share) <= self._query_used_s * share
            return score if behind else query
        if query is not None:
            return query
        if score is not None:
            return score
        if memory.maintenance_due:
            return Maintenance(self.policy.maintenance_slice_s)
        return None

    def account(self, item: WorkItem, elapsed_s: float, now: float) -> None:
        """The engine reports how long ``item`` took on the device."""
        if isinstance(item, EncodeBatch):
            share = self.policy.query_share
            self._query_credit_s = elapsed_s * share / (1.0 - share)
            share = self.policy.evaluation_share
            # the last chunk's overshoot past its credit is repaid, so the share holds
            debt = min(self._eval_credit_s, 0.0)
            self._eval_credit_s = debt + elapsed_s * share / (1.0 - share)
        elif isinstance(item, QUERY_WORK):
            self._query_credit_s -= elapsed_s
            self._query_used_s += elapsed_s
        elif isinstance(item, ScoreBatch):
            self._eval_credit_s -= elapsed_s
            self._eval_used_s += elapsed_s
        elif isinstance(item, Maintenance):
            self._maintenance_waiting_since = None

    def next_deadline(self, jobs: Sequence[JobView]) -> float | None:
        """When the engine must wake up at the latest, even if no work arrives."""
        return min((j.deadline_at for j in jobs), default=None)

    # ---- policy details ------------------------------------------------------------------

    def _query_work(self, jobs: Sequence[JobView], memory: MemoryState) -> WorkItem | None:
        running = [j for j in jobs if j.phase != "queued"]
        if len(running) < self.policy.max_in_flight:
            for job in jobs:  # FIFO; a job waiting for memory does not block those behind it
                if job.phase == "queued" and memory_ready(job.streams, memory):
                    return StartJob(job.id)
        decoding = [j.id for j in running if j.phase == "decode"]
        prefilling = [j for j in running if j.phase == "prefill"]
        decode = self._decode_step(decoding) if decoding else None
        prefill = (
            PrefillChunk(prefilling[0].id, self.policy.prefill_chunk_tokens) if prefilling else None
        )
        if decode is not None and (prefill is None or self._decode_next):
            self._decode_next = False
            return decode
        if prefill is not None:
            self._decode_next = True
            return prefill
        return None

    def _decode_step(self, decoding: list[int]) -> DecodeStep:
        limit = self.policy.decode_batch_max
        if len(decoding) <= limit:
            return DecodeStep(tuple(decoding))
        start = self._decode_cursor % len(decoding)
        self._decode_cursor = start + limit
        rotated = decoding[start:] + decoding[:start]
        return DecodeStep(tuple(sorted(rotated[:limit])))

    def _maintenance_overdue(self, memory: MemoryState, now: float) -> bool:
        if not memory.maintenance_due:
            self._maintenance_waiting_since = None
            return False
        if self._maintenance_waiting_since is None:
            self._maintenance_waiting_since = now
        return now - self._maintenance_waiting_since >= self.policy.maintenance_max_wait_s
