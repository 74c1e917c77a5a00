"""Wire formats of the query service, all versioned (``v: 1``) and JSON-serialisable.

Requests (client → daemon, on the request stream or the ask channel)::

    {"id": "q1", "stream": "cam1" | ["cam1", "cam2"] | "*", "question": "...",
     "since": "-15m" | 1732400000 | "2026-11-24T04:00:00Z", "until": ..., "max_new_tokens": 128,
     "temperature": 0.0, "top_p": 1.0, "deadline_s": 120}

Replies (daemon → client, on ``reply:<id>``; the final or error event is also stored at
``answer:<id>``)::

    {"type": "token", "v": 1, "id": "q1", "index": 0, "text": "The"}
    {"type": "final", "v": 1, "id": "q1", "stream": [...], "answer": "...", ...Answer}
    {"type": "error", "v": 1, "id": "q1", "code": "invalid_request", "message": "..."}

Plus the daemon status snapshot (:class:`DaemonStatus`) on the status channel.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sinks.redact import redact_url
from sinks.settings import QuerySettings
from streamer.engine.errors import InvalidRequest

SCHEMA_VERSION: Final[Literal[1]] = 1
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
STREAM_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
ALL_STREAMS = "*"
MAX_STREAMS_PER_REQUEST = 256
MAX_REQUEST_BYTES = 1_000_000  # far above any valid request; stops a giant payload early
MAX_JSON_DEPTH = 16  # a request is two levels deep; json.loads recurses (RecursionError)
MAX_NUMBER_CHARS = 32  # longest number literal; a 400-digit int overflows float()
MAX_ERROR_CHARS = 300  # error text sent to clients: one line, at most this long
STATUS_GAPS_SHOWN = 20  # most recent gaps per stream kept in a status snapshot

_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)
_STREAM_NAME_RE = re.compile(STREAM_NAME_PATTERN)
_RELATIVE_RE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_EPOCH_MAX_S = 1e11  # year ~5138: anything later is a unit mistake (ms instead of s)
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET_RE = re.compile(r"[\[\]{}]")
_SALVAGE_ID_RE = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:-]{1,128})"')
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


# ----------------------------------------------------------------------------- time ranges


def resolve_time(value: str | float | int | None, now: float) -> float | None:
    """A request's ``since``/``until`` as epoch seconds (UTC).

    Accepts None (open end), a number of epoch seconds, a numeric string, a relative time
    ``-<n><s|m|h|d>`` meaning ``now`` minus that (``-15m``, ``-2h``, ``-1.5h``, ``-30s``, ``-1d``),
    ``"now"``, or an ISO 8601 datetime (``Z`` or an offset; a naive one is taken as UTC).
    Raises ValueError for anything else, booleans, non-finite or out-of-range times.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("a time must be a number, a relative time like -15m, or ISO 8601")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError as exc:  # an int beyond float's range
            raise ValueError("time out of range (epoch seconds from 0 to 1e11)") from exc
    elif isinstance(value, str):
        text = value.strip()
        relative = _RELATIVE_RE.match(text)
        if relative:
            seconds = now - float(relative.group(1)) * _UNIT_S[relative.group(2)]
        elif text == "now":
            seconds = now
        else:
            seconds = _parse_absolute(text)
    else:
        raise ValueError("a time must be a number, a relative time like -15m, or ISO 8601")
    if not math.isfinite(seconds) or not 0.0 <= seconds <= _EPOCH_MAX_S:
        raise ValueError("time out of range (epoch seconds from 0 to 1e11)")
    return seconds


def _parse_absolute(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(
            f"cannot read time {text[:40]!r}: use epoch seconds, -15m/-2h/-30s/-1d or ISO 8601"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# ----------------------------------------------------------------------------- requests


class QueryRequest(BaseModel):
    """One question. Validate with :func:`parse_request` so the daemon's limits apply.

    After validation ``since``/``until`` are epoch seconds (None = open end) and ``stream`` is a
    tuple of names, ``("*",)`` meaning every stream.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version.")
    id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        pattern=REQUEST_ID_PATTERN,
        description="Request id chosen by the client; replies go to reply:<id>.",
    )
    stream: tuple[str, ...] = Field(
        (ALL_STREAMS,), description="Stream names to ask about; ('*',) = all streams."
    )
    question: str = Field(min_length=1, max_length=100_000, description="The question.")
    since: float | None = Field(None, description="Start of the time range, epoch seconds.")
    until: float | None = Field(None, description="End of the time range, epoch seconds.")
    max_new_tokens: int = Field(
        128, ge=1, le=131_072, strict=True, description="Most tokens to generate."
    )
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, strict=True, description="Sampling temperature; 0 = greedy."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True, description="Nucleus sampling mass.")
    deadline_s: float = Field(
        120.0, ge=0.1, le=3600.0, strict=True, description="Seconds until the query fails."
    )

    @property
    def all_streams(self) -> bool:
        return self.stream == (ALL_STREAMS,)

    @model_validator(mode="before")
    @classmethod
    def _daemon_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        settings = _settings(info)
        if settings is not None and isinstance(data, Mapping):
            data = dict(data)
            data.setdefault("max_new_tokens", settings.default_max_new_tokens)
            data.setdefault("deadline_s", settings.default_deadline_s)
        return data

    @field_validator("stream", mode="before")
    @classmethod
    def _streams(cls, value: Any) -> tuple[str, ...]:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list | tuple) or not names:
            raise ValueError("must be a stream name, a non-empty list of names, or '*'")
        if len(names) > MAX_STREAMS_PER_REQUEST:
            raise ValueError(f"at most {MAX_STREAMS_PER_REQUEST} streams")
        unique: list[str] = []
        for name in names:
            if not isinstance(name, str) or not (
                name == ALL_STREAMS or _STREAM_NAME_RE.match(name)
            ):
                raise ValueError("stream names are 1-128 characters of A-Za-z0-9_.:-")
            if name not in unique:
                unique.append(name)
        if ALL_STREAMS in unique and len(unique) > 1:
            raise ValueError("'*' cannot be combined with stream names")
        return tuple(unique)

    @field_validator("question")
    @classmethod
    def _question(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        settings = _settings(info)
        if settings is not None and len(value) > settings.max_question_chars:
            raise ValueError(f"longer than {settings.max_question_chars} characters")
        return value

    @field_validator("since", "until", mode="before")
    @classmethod
    def _time(cls, value: Any, info: ValidationInfo) -> float | None:
        now = info.context.get("now") if isinstance(info.context, dict) else None
        return resolve_time(value, time.time() if now is None else float(now))

    @field_validator("max_new_tokens")
    @classmethod
    def _token_limit(cls, value: int, info: ValidationInfo) -> int:
        settings = _settings(info)
        if settings is not None and value > settings.max_new_tokens_limit:
            raise ValueError(f"must be <= {settings.max_new_tokens_limit}")
        return value

    @model_validator(mode="after")
    def _range(self) -> QueryRequest:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be earlier than until")
        return self


def _settings(info: ValidationInfo) -> QuerySettings | None:
    if isinstance(info.context, dict):
        settings = info.context.get("settings")
        if isinstance(settings, QuerySettings):
            return settings
    return None


def decode_request(raw: str | bytes) -> Any:
    """The JSON value of a request payload (raw bytes from Redis, or text).

    Raises InvalidRequest, never anything else, for input that is too big, not UTF-8, nested
    deeper than MAX_JSON_DEPTH, or holds a number literal longer than MAX_NUMBER_CHARS, NaN or
    an infinity: the bounds are checked before or while parsing, so no input can make the
    parser recurse or overflow.
    """
    if len(raw) > MAX_REQUEST_BYTES:
        raise InvalidRequest(f"request larger than {MAX_REQUEST_BYTES} bytes")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"request is not UTF-8 (bad byte at offset {exc.start})") from exc
    else:
        text = raw
    if _nested_too_deep(text):
        raise InvalidRequest(f"request JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(
            text, parse_int=_bounded_int, parse_float=_bounded_float, parse_constant=_no_constant
        )
    except InvalidRequest:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidRequest(f"request is not valid JSON: {exc}") from exc


def _nested_too_deep(text: str) -> bool:
    """True if arrays/objects in ``text`` nest deeper than MAX_JSON_DEPTH.

    Brackets inside strings do not count. A scan, not a parse: malformed input is left for
    json.loads to report.
    """
    brackets = _JSON_STRING_RE.sub("", text)
    if brackets.count("[") + brackets.count("{") <= MAX_JSON_DEPTH:
        return False  # too few openings to nest that deep: the common case, no loop
    depth = 0
    for match in _JSON_BRACKET_RE.finditer(brackets):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            return True
    return False


def _bounded_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise InvalidRequest(f"number longer than {MAX_NUMBER_CHARS} digits")
    return int(literal)


def _bounded_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise InvalidRequest(f"number longer than {MAX_NUMBER_CHARS} characters")
    value = float(literal)
    if not math.isfinite(value):
        raise InvalidRequest(f"number {literal} is out of range")
    return value


def _no_constant(literal: str) -> Any:
    raise InvalidRequest(f"{literal} is not a valid number")


def salvage_request_id(raw: str | bytes) -> str | None:
    """The ``"id"`` of a payload that could not be decoded, to address its error reply.

    A plain byte search, no parsing: it works on non-UTF-8, truncated or hostile input.
    """
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    match = _SALVAGE_ID_RE.search(data[:MAX_REQUEST_BYTES])
    return match.group(1).decode("ascii") if match else None


def json_object(data: Any) -> dict[str, Any] | None:
    """A JSON object from a message or key, or None (absent, not JSON, not an object)."""
    if not isinstance(data, str | bytes):
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def one_line(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters (error texts to clients)."""
    line = _CONTROL_RE.sub(" ", str(text)).strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def parse_request(payload: Any, settings: QuerySettings, now: float) -> QueryRequest:
    """Validate a decoded request under the daemon's limits, resolving times against ``now``.

    Raises InvalidRequest with a short message naming the first bad field.
    """
    if not isinstance(payload, Mapping):
        raise InvalidRequest("request must be a JSON object")
    try:
        return QueryRequest.model_validate(payload, context={"settings": settings, "now": now})
    except ValidationError as exc:
        raise InvalidRequest(_short_message(exc)) from exc


def request_id_of(payload: Any) -> str | None:
    """The request's id if it has a usable one (to address an error reply), else None."""
    if isinstance(payload, Mapping):
        candidate = payload.get("id")
        if isinstance(candidate, str) and _REQUEST_ID_RE.match(candidate):
            return candidate
    return None


def is_request_id(value: str) -> bool:
    return bool(_REQUEST_ID_RE.match(value))


def _short_message(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "field required"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{field}: {message}{suffix}" if field else f"{message}{suffix}"


@dataclass(frozen=True, slots=True)
class QueryTicket:
    """A validated request handed to the engine.

    ``entry_id`` is the request-stream entry to XACK once answered (None for the pub/sub path);
    ``received_at`` is when the intake read it, epoch seconds; ``sent_at`` when the client sent
    it (the stream entry's XADD time), if known: a request waiting in the stream for room
    spends its own deadline there. ``ack_stream``: the stream holding the entry, when it is not
    the request stream (a fleet inbox).
    """

    request: QueryRequest
    entry_id: str | None
    received_at: float
    sent_at: float | None = None
    ack_stream: str | None = None

    @property
    def deadline_at(self) -> float:
        """Epoch seconds after which the query should fail with ``timeout``."""
        start = self.received_at if self.sent_at is None else min(self.sent_at, self.received_at)
        return start + self.request.deadline_s


# ----------------------------------------------------------------------------- answers


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Span(_Out):
    """A span of one stream's memory, epoch (or media) seconds."""

    stream: str
    start: float
    end: float

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if self.end < self.start:
            raise ValueError("end must not be before start")
        return self


class AttendedSpan(Span):
    """A span whose tokens survived attention-based dropping; ``mass`` = attention share."""

    mass: float = Field(ge=0.0)


class HistorySpan(_Out):
    start: float
    end: float


class GapSpan(Span):
    """An interval inside the read history that was not seen, and why."""

    reason: str


class Section(_Out):
    """One owner's part of a merged answer: its streams, and its answer or why there is none."""

    stream: tuple[str, ...] = Field(description="Streams this part covers.")
    daemon: str | None = Field(None, description="The owner that answered; None: no owner.")
    answer: str | None = Field(None, description="The owner's answer; None when it has none.")
    error: str | None = Field(None, description="Error code instead of an answer (no_owner, ...).")
    message: str | None = Field(None, description="One line saying why, with an error.")
    frames: int = Field(0, ge=0)
    latency_s: float | None = Field(None, ge=0.0, description="The owner's own latency, s.")


class FrameRef(Span):
    """One stored JPEG (an evidence frame) of a clip inside a cited span."""

    path: str = Field(description="Absolute path on the daemon's disk.")
    url: str | None = Field(
        None, description="GET it here (the daemon's HTTP server), when that server runs."
    )


MAX_EVIDENCE_FRAMES = 256  # the bound of memory.frames.max_per_answer


class Answer(_Out):
    """The final answer to one request, with what it read."""

    v: Literal[1] = SCHEMA_VERSION
    id: str = Field(pattern=REQUEST_ID_PATTERN)
    stream: tuple[str, ...] = Field(description="Streams actually read.")
    question: str
    answer: str
    evidence: tuple[Span, ...] = Field((), description="Memory spans read, in time order.")
    attended: tuple[AttendedSpan, ...] = Field(
        (), description="Spans that survived attention dropping, by attention mass (largest first)."
    )
    frames: int = Field(0, ge=0, description="Frames' worth of history read.")
    history: HistorySpan | None = Field(None, description="Time range covered by the read.")
    gaps: tuple[GapSpan, ...] = Field((), description="Gaps inside the covered range.")
    static: tuple[Span, ...] = Field(
        (), description="Spans without change (motion gating) inside the covered range."
    )
    latency_s: float = Field(ge=0.0, description="Receipt to final token, seconds.")
    ttft_s: float | None = Field(None, ge=0.0, description="Receipt to first token, seconds.")
    tokens: int = Field(0, ge=0, description="Tokens generated.")
    model: str = Field(description="Model (checkpoint) that answered.")
    evidence_frames: tuple[FrameRef, ...] = Field(
        (),
        max_length=MAX_EVIDENCE_FRAMES,
        description="Stored JPEGs of the cited spans (one per span, at most "
        "memory.frames.max_per_answer), in time order.",
    )
    # Added for fleets (schema v1, additive: older answers read with the defaults).
    daemon: str | None = Field(
        None, description="The daemon that answered (for a merged answer: its coordinator)."
    )
    sections: tuple[Section, ...] = Field(
        (), description="A merged answer's parts, one per owner, in the order of its streams."
    )

    @field_validator("evidence")
    @classmethod
    def _time_order(cls, spans: tuple[Span, ...]) -> tuple[Span, ...]:
        return tuple(sorted(spans, key=lambda s: (s.start, s.end, s.stream)))

    @field_validator("attended")
    @classmethod
    def _by_mass(cls, spans: tuple[AttendedSpan, ...]) -> tuple[AttendedSpan, ...]:
        return tuple(sorted(spans, key=lambda s: (-s.mass, s.start)))


EventType = Literal["token", "final", "error"]


def token_event(request_id: str, index: int, text: str) -> str:
    """JSON of one generated token (piece of text) for the reply channel."""
    return json.dumps(
        {"type": "token", "v": SCHEMA_VERSION, "id": request_id, "index": index, "text": text},
        ensure_ascii=False,
    )


def final_event(answer: Answer) -> str:
    """JSON of the final event: the answer's fields plus ``type``."""
    return json.dumps({"type": "final", **answer.model_dump(mode="json")}, ensure_ascii=False)


def error_event(request_id: str, code: str, message: str) -> str:
    """JSON of an error event; the message is made one line (see :func:`one_line`)."""
    return json.dumps(
        {
            "type": "error",
            "v": SCHEMA_VERSION,
            "id": request_id,
            "code": code,
            "message": one_line(message),
        },
        ensure_ascii=False,
    )


# ----------------------------------------------------------------------------- forget


class ForgetRequest(BaseModel):
    """Remove ``[since, until)`` from one stream's memory (privacy), on ``<prefix>:forget``.

    Idempotent: forgetting an interval twice is the same as once, so a client that gets no
    confirmation simply sends it again.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version.")
    id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        pattern=REQUEST_ID_PATTERN,
        description="Request id; the confirmation goes to reply:<id>.",
    )
    stream: str = Field(pattern=STREAM_NAME_PATTERN, description="The stream to edit.")
    since: float = Field(description="Start of the interval, epoch seconds (or -15m, ISO).")
    until: float = Field(description="End of the interval, epoch seconds (or -15m, ISO).")

    @field_validator("since", "until", mode="before")
    @classmethod
    def _time(cls, value: Any, info: ValidationInfo) -> float | None:
        now = info.context.get("now") if isinstance(info.context, dict) else None
        return resolve_time(value, time.time() if now is None else float(now))

    @model_validator(mode="after")
    def _range(self) -> ForgetRequest:
        if self.since >= self.until:
            raise ValueError("since must be earlier than until")
        return self


def parse_forget(raw: str | bytes, now: float) -> ForgetRequest:
    """Validate a forget message; raises InvalidRequest naming the first bad field."""
    payload = decode_request(raw)
    try:
        return ForgetRequest.model_validate(payload, context={"now": now})
    except ValidationError as exc:
        raise InvalidRequest(_short_message(exc)) from exc


def forgotten_event(request: ForgetRequest) -> str:
    """JSON of the confirmation that an interval was forgotten."""
    forgotten = {"stream": request.stream, "start": request.since, "end": request.until}
    return json.dumps({"type": "final", "v": SCHEMA_VERSION, "id": request.id,
                       "forgotten": forgotten})  # fmt: skip


# ----------------------------------------------------------------------------- status


class _Snapshot(BaseModel):
    # Readers ignore fields a newer daemon adds, so `flashwatch status` survives upgrades.
    model_config = ConfigDict(extra="ignore", frozen=True)


class DaemonInfo(_Snapshot):
    pid: int
    started_at: float = Field(description="Epoch seconds.")
    uptime_s: float = Field(ge=0.0)
    version: str
    model: str
    device: str


class MemoryStatus(_Snapshot):
    tokens: int = Field(0, ge=0, description="Tokens held.")
    budget_tokens: int = Field(0, ge=0, description="This stream's token budget.")
    bytes: int = Field(0, ge=0)
    budget_bytes: int = Field(0, ge=0)
    fill: float = Field(0.0, ge=0.0, description="tokens / budget, 0..1 (may exceed briefly).")
    span: tuple[float, float] | None = Field(None, description="[start, end] of history held.")
    levels: dict[int, int] = Field(default_factory=dict, description="level -> segments.")
    capacity_hours: float | None = Field(None, ge=0.0, description="History the budget holds.")
    segments: int = Field(0, ge=0)
    static_segments: int = Field(0, ge=0, description="Segments standing for a static span.")
    static_seconds: float = Field(0.0, ge=0.0, description="History recorded as unchanged, s.")


class MotionStatus(_Snapshot):
    """One stream's motion gate (absent when the stream is not gated)."""

    clips_skipped: int = Field(0, ge=0, description="Clips not encoded: nothing changed.")
    clips_keepalive: int = Field(0, ge=0, description="Static clips encoded by the keep-alive.")
    clips_motion: int = Field(0, ge=0, description="Clips encoded because something changed.")
    clips_first: int = Field(0, ge=0, description="Clips encoded after a discontinuity.")
    static_s: float = Field(0.0, ge=0.0, description="Stream seconds of skipped clips.")
    motion_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Clips with motion among the last hour's clips."
    )
    last_score: float = Field(0.0, ge=0.0, le=1.0, description="Changed area of the last clip.")
    static_since: float | None = Field(None, description="Start of the current static stretch.")
    encoder_saved_s: float | None = Field(
        None, ge=0.0, description="Encoder time saved: skipped clips x mean encode time, s."
    )
    detector_ms_per_frame: float = Field(0.0, ge=0.0, description="Detector CPU per frame, ms.")


class GapStatus(_Snapshot):
    start: float
    end: float
    reason: str


class StreamStatus(_Snapshot):
    name: str
    url: str = Field(description="Source URL, credentials redacted.")
    state: str = Field(description="connecting, live, stalled, reconnecting, offline, ...")
    fps_in: float = 0.0
    fps_sampled: float = 0.0
    dropped: dict[str, int] = Field(default_factory=dict, description="drop reason -> count")
    clips: int = 0
    reconnects: int = 0
    reconnects_last_hour: int = 0
    stalls_last_hour: int = 0
    quality: str = "unknown"
    last_error: str | None = None
    memory: MemoryStatus | None = None
    motion: MotionStatus | None = Field(None, description="Motion gating (gated streams only).")
    gaps: tuple[GapStatus, ...] = Field((), description=f"Most recent {STATUS_GAPS_SHOWN}.")

    @field_validator("url")
    @classmethod
    def _redacted(cls, value: str) -> str:
        # Belt and braces: a status snapshot never carries a credential, whoever built it.
        return redact_url(value)

    @field_validator("gaps")
    @classmethod
    def _recent(cls, gaps: tuple[GapStatus, ...]) -> tuple[GapStatus, ...]:
        return tuple(sorted(gaps, key=lambda g: g.start)[-STATUS_GAPS_SHOWN:])


class QueryStats(_Snapshot):
    pending: int = Field(0, description="Queries queued in the engine (or held for memory).")
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    ttft_p95_s: float | None = None
    # Added in flashwatch 0.x, optional so older snapshots still read (schema v1, additive).
    stream_waiting: int | None = Field(
        None, ge=0, description="Request-stream entries not yet read (the group's lag)."
    )
    stream_pending: int | None = Field(
        None, ge=0, description="Request-stream entries read and not yet answered (XPENDING)."
    )
    dead_letters: int | None = Field(
        None, ge=0, description="Entries in the dead-letter stream <prefix>:requests:dead."
    )
    prefix_hits: int = Field(
        0, ge=0, description="Prefills resumed from a cached question-independent prefix."
    )
    prefix_misses: int = Field(0, ge=0, description="Prefills that computed their prefix.")
    kv_slots_free: int | None = Field(None, ge=0, description="Free slots of the KV pool.")


class EncoderStatus(_Snapshot):
    clips_encoded: int = 0
    batches: int = 0
    lag_s: float = 0.0
    last_batch_ms: float | None = None
    failures: dict[str, int] = Field(default_factory=dict, description="Failed clips by cause.")
    state: str = Field("running", description="running, or failed (the device kept failing).")
    failure: str | None = Field(None, description="Why the engine failed.")


class RedisStatus(_Snapshot):
    state: str = Field(
        "connecting",
        description="connecting, connected, unreachable, auth_failed, no_permission.",
    )
    url: str = Field("", description="The daemon's Redis, credentials redacted.")
    last_error: str | None = Field(None, description="One line: why it is not connected.")
    since: float | None = Field(None, description="Epoch seconds of the last change of state.")

    @field_validator("url")
    @classmethod
    def _redacted(cls, value: str) -> str:
        return redact_url(value) if value else value


class SnapshotStatus(_Snapshot):
    """Memory snapshot health (``memory.writer.SnapshotHealth``)."""

    enabled: bool = False
    last_success_at: float | None = Field(None, description="Epoch seconds.")
    failures: int = Field(0, ge=0, description="Failed snapshots since start.")
    last_error: str | None = Field(None, description="The latest failure, one line.")
    bytes_written: int = Field(0, ge=0, description="Data and manifests, since start.")
    last_snapshot_bytes: int = Field(0, ge=0, description="Written by the latest snapshot.")
    queued: int = Field(0, ge=0, description="Chunks waiting for the writer thread.")


class FrameStoreStatus(_Snapshot):
    """The evidence frame store (``memory.frames.FrameStats``)."""

    frames: int = Field(0, ge=0, description="JPEGs held.")
    bytes: int = Field(0, ge=0, description="Their size on disk together.")
    budget_bytes: int = Field(0, ge=0, description="memory.frames.budget_mb in bytes.")
    written: int = Field(0, ge=0, description="Frames stored since start.")
    dropped: int = Field(0, ge=0, description="Frames not kept: the encoder thread was behind.")
    failed: int = Field(0, ge=0, description="Frames not kept: encoding or writing failed.")
    evicted: int = Field(0, ge=0, description="Deleted for the disk budget or the retention.")
    queued: int = Field(0, ge=0, description="Waiting for the encoder thread.")


class AlertRuleStatus(_Snapshot):
    """One standing query (``streamer.app.alerts``)."""

    name: str
    kind: str = Field(description="condition or summary.")
    state: str = Field(description="clear, firing (conditions) or scheduled (summaries).")
    last_score: float | None = Field(None, description="P(yes) of the last evaluation.")
    last_fired: float | None = Field(None, description="Epoch seconds of the last firing.")
    last_eval: float | None = Field(None, description="Epoch seconds of the last evaluation.")
    seq: int = Field(0, ge=0, description="Sequence of its last event (alert id <name>:<seq>).")
    lag_s: float | None = Field(None, description="Due to scored, last evaluation, seconds.")
    next_at: float | None = Field(None, description="Next scheduled run (summaries).")
    pending: bool = Field(False, description="An event decided and not yet taken by a sink.")
    error: str | None = None


class AlertsStatus(_Snapshot):
    rules: tuple[AlertRuleStatus, ...] = ()
    counters: dict[str, int] = Field(default_factory=dict)
    sinks: tuple[dict[str, Any], ...] = Field((), description="Each channel's counters.")


class LeaseStatus(_Snapshot):
    stream: str
    fence: int = Field(ge=0, description="The lease's fencing number.")
    age_s: float = Field(0.0, ge=0.0, description="Seconds since this daemon took the lease.")
    renewed_s_ago: float = Field(0.0, ge=0.0, description="Seconds since its last renewal.")


class FleetStatus(_Snapshot):
    """This daemon among several on one Redis (sinks.fleet)."""

    daemon_id: str
    placement: str = Field("static", description="static or auto.")
    lease_ttl_s: float = Field(0.0, ge=0.0)
    leases: tuple[LeaseStatus, ...] = Field((), description="The streams it owns now.")
    standby: tuple[str, ...] = Field((), description="Streams it may serve, owned elsewhere.")
    provisional: tuple[str, ...] = Field(
        (), description="Streams run before Redis answered, their leases not taken yet."
    )
    routing: dict[str, int] = Field(
        default_factory=dict,
        description="Requests this daemon coordinated over other daemons' streams: "
        "coordinated, delivered, duplicates, resent, no_owner, swept.",
    )
    coordinating: int = Field(0, ge=0, description="Routed requests in progress here.")


class DaemonStatus(_Snapshot):
    """One immutable snapshot of the whole daemon, published about once a second."""

    v: Literal[1] = SCHEMA_VERSION
    time: float = Field(description="Epoch seconds when taken.")
    daemon: DaemonInfo
    streams: tuple[StreamStatus, ...] = ()
    queries: QueryStats = QueryStats()
    encoder: EncoderStatus = EncoderStatus()
    redis: RedisStatus | None = Field(None, description="The daemon's view of its Redis.")
    snapshots: SnapshotStatus = SnapshotStatus()
    frames: FrameStoreStatus | None = Field(None, description="Evidence frames (None: off).")
    alerts: AlertsStatus | None = Field(None, description="Standing queries, when any run.")
    fleet: FleetStatus | None = Field(None, description="Leases and placement (sinks.fleet).")
