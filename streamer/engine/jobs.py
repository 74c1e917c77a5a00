"""The job table: every query the engine holds, from queued to answered. Event-loop only.

A job is mutable bookkeeping (phase, tokens, text streamed so far); the scheduler sees it only
as a frozen ``JobView``. Device-side state (KV caches, sampling generators) lives in the runner,
keyed by the same job id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from model.detok import IncrementalDetokenizer
from streamer.engine.scheduler import JobView, Phase
from streamer.engine.types import Ticket


@dataclass
class Job:
    id: int
    ticket: Ticket
    detok: IncrementalDetokenizer
    phase: Phase = "queued"
    cancelled: bool = False
    prefill_left: int = 0
    first_token_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # text events published

    @property
    def request_id(self) -> str:
        return self.ticket.request.id

    def view(self) -> JobView:
        return JobView(
            id=self.id,
            phase=self.phase,
            streams=self.ticket.request.stream,
            deadline_at=self.ticket.deadline_at,
            cancelled=self.cancelled,
            prefill_left=self.prefill_left,
        )


class JobTable:
    """Jobs in arrival order; bounded by the engine's admission (``room``, ``Busy``)."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._next_id = 0

    def add(self, ticket: Ticket, detok: IncrementalDetokenizer) -> Job:
        self._next_id += 1
        job = Job(self._next_id, ticket, detok)
        self._jobs[job.id] = job
        return job

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def remove(self, job_id: int) -> Job | None:
        return self._jobs.pop(job_id, None)

    def by_request(self, request_id: str) -> list[Job]:
        return [job for job in self._jobs.values() if job.request_id == request_id]

    def views(self) -> list[JobView]:
        return [job.view() for job in self._jobs.values()]

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def queued(self) -> int:
        return sum(1 for job in self._jobs.values() if job.phase == "queued")

    @property
    def quick_queued(self) -> int:
        return sum(
            1 for job in self._jobs.values() if job.phase == "queued" and not job.ticket.durable
        )

    @property
    def in_flight(self) -> int:
        return len(self._jobs) - self.queued
