"""The engine's own domain types: a query, a ticket, an answer and the spans an answer cites.

Plain frozen dataclasses, so the engine never depends on a wire format: ``sinks`` converts its
Redis models to and from these at the boundary (``sinks/domain.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from memory.evidence import EvidenceFrame

ALL_STREAMS = "*"


@dataclass(frozen=True, slots=True)
class Query:
    """One question, already validated (limits applied, times resolved to epoch seconds)."""

    id: str
    question: str
    stream: tuple[str, ...] = (ALL_STREAMS,)  # ("*",) = every stream
    since: float | None = None
    until: float | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    deadline_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """A query handed to the engine.

    ``entry_id`` names the durable request to acknowledge once answered (None: a quick,
    at-most-once request); ``received_at`` is when it was read, epoch seconds; ``sent_at`` when
    the client sent it (a stream entry's XADD time), if known: a request waiting in the stream
    for room spends its own deadline there. ``ack_stream`` is the Redis stream holding that
    entry when it is not the shared request stream (a daemon's fleet inbox).
    """

    request: Query
    entry_id: str | None
    received_at: float
    sent_at: float | None = None
    ack_stream: str | None = None

    @property
    def durable(self) -> bool:
        return self.entry_id is not None

    @property
    def deadline_at(self) -> float:
        """Epoch seconds after which the query fails with ``timeout``."""
        start = self.received_at if self.sent_at is None else min(self.sent_at, self.received_at)
        return start + self.request.deadline_s


@dataclass(frozen=True, slots=True)
class Span:
    stream: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class AttendedSpan:
    stream: str
    start: float
    end: float
    mass: float  # attention mass of the last prompt token on this span's kept tokens


@dataclass(frozen=True, slots=True)
class GapSpan:
    stream: str
    start: float
    end: float
    reason: str


@dataclass(frozen=True, slots=True)
class Answer:
    """The final answer to one query, with what it read."""

    id: str
    streams: tuple[str, ...]
    question: str
    text: str
    evidence: tuple[Span, ...]  # time order
    attended: tuple[AttendedSpan, ...]  # largest attention mass first
    frames: int
    history: tuple[float, float] | None
    gaps: tuple[GapSpan, ...]
    latency_s: float
    ttft_s: float | None
    tokens: int
    model: str
    static: tuple[Span, ...] = ()  # spans the memory holds as unchanged (motion gating)
    evidence_frames: tuple[EvidenceFrame, ...] = ()  # stored JPEGs of the cited spans


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """Yes/no questions over one window of memory (standing conditions evaluated together).

    ``share_prefix``: the questions share the window's prefix KV (the engine's prefix cache);
    False runs a full prefill per question (a baseline for benchmarks).
    """

    questions: tuple[str, ...]
    stream: tuple[str, ...]
    since: float | None = None
    until: float | None = None
    share_prefix: bool = True


@dataclass(frozen=True, slots=True)
class Scores:
    """P(yes) per question (request order), normalised over yes/no, and what was read."""

    values: tuple[float, ...]
    history: tuple[float, float]  # the window the prompts read, stream seconds
    frames: int
    prefix_hit: bool  # the shared prefix came from the cache
    device_s: float  # device time the round took
