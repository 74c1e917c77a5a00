"""The boundary between the Redis wire models (``sinks.schema``) and the engine's domain types.

The engine never imports a wire model: the intake turns a validated ``QueryRequest`` into an
engine ``Ticket``, and the reply publisher turns an engine ``Answer`` into the wire ``Answer``.
"""

from __future__ import annotations

from sinks import schema
from streamer.engine import types


def query_of(request: schema.QueryRequest) -> types.Query:
    return types.Query(
        id=request.id,
        question=request.question,
        stream=tuple(request.stream),
        since=request.since,
        until=request.until,
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        deadline_s=request.deadline_s,
    )


def ticket_of(
    request: schema.QueryRequest,
    entry_id: str | None,
    received_at: float,
    *,
    sent_at: float | None = None,
    ack_stream: str | None = None,
) -> types.Ticket:
    return types.Ticket(query_of(request), entry_id, received_at, sent_at, ack_stream)


def wire_answer(answer: types.Answer | schema.Answer) -> schema.Answer:
    """The wire form of an engine answer (a wire answer passes through unchanged)."""
    if isinstance(answer, schema.Answer):
        return answer
    return schema.Answer(
        id=answer.id,
        stream=answer.streams,
        question=answer.question,
        answer=answer.text,
        evidence=tuple(schema.Span(stream=s.stream, start=s.start, end=s.end)
                       for s in answer.evidence),
        attended=tuple(
            schema.AttendedSpan(stream=s.stream, start=s.start, end=s.end, mass=max(0.0, s.mass))
            for s in answer.attended
        ),
        frames=answer.frames,
        history=None
        if answer.history is None
        else schema.HistorySpan(start=answer.history[0], end=answer.history[1]),
        gaps=tuple(
            schema.GapSpan(stream=g.stream, start=g.start, end=g.end, reason=g.reason)
            for g in answer.gaps
        ),
        static=tuple(schema.Span(stream=s.stream, start=s.start, end=s.end)
                     for s in answer.static),
        latency_s=answer.latency_s,
        ttft_s=answer.ttft_s,
        tokens=answer.tokens,
        model=answer.model,
        evidence_frames=tuple(schema.FrameRef(**f.as_dict()) for f in answer.evidence_frames),
    )  # fmt: skip
