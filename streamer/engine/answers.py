"""Answers: the final answer to a query, with what it read and what survived dropping.

(The text streamed as tokens come is ``model.detok.IncrementalDetokenizer``'s.)
"""

from __future__ import annotations

from dataclasses import dataclass

from memory.segments import Segment
from streamer.engine.planner import QueryPlan
from streamer.engine.types import Answer, AttendedSpan, GapSpan, Span, Ticket


@dataclass(frozen=True, slots=True)
class PrefillSummary:
    """What the prefill says about the visual tokens (host lists, read once per query)."""

    kept_visual: tuple[int, ...]  # indices into the plan's visual tokens that survived dropping
    visual_attention: tuple[float, ...] | None  # their attention mass (None: no scored stage)


def build_answer(
    ticket: Ticket,
    plan: QueryPlan,
    prefill: PrefillSummary | None,
    *,
    text: str,
    tokens: int,
    first_token_at: float | None,
    now: float,
    model_name: str,
) -> Answer:
    """The final answer: text, evidence spans, attended spans ranked by attention mass."""
    evidence = sorted(
        (Span(part.stream, seg.start, seg.end) for part in plan.parts for seg in part.segments),
        key=lambda span: (span.start, span.end, span.stream),
    )
    gaps = tuple(
        GapSpan(part.stream, gap.start, gap.end, gap.reason or "gap")
        for part in plan.parts
        for gap in part.gaps
    )
    static = tuple(Span(part.stream, lo, hi) for part in plan.parts for lo, hi in part.statics)
    received = ticket.received_at
    return Answer(
        id=ticket.request.id,
        streams=tuple(part.stream for part in plan.parts),
        question=ticket.request.question,
        text=text,
        evidence=tuple(evidence),
        attended=attended_spans(plan, prefill),
        frames=plan.frames,
        history=plan.history,
        gaps=gaps,
        static=static,
        latency_s=max(0.0, now - received),
        ttft_s=None if first_token_at is None else max(0.0, first_token_at - received),
        tokens=tokens,
        model=model_name,
    )


def attended_spans(plan: QueryPlan, prefill: PrefillSummary | None) -> tuple[AttendedSpan, ...]:
    """Segments whose tokens survived dropping, ranked by the attention mass they received."""
    if prefill is None:
        return ()
    owners = plan.owner_of()
    masses = prefill.visual_attention or (0.0,) * len(prefill.kept_visual)
    totals: dict[tuple[str, Segment], float] = {}
    for index, mass in zip(prefill.kept_visual, masses, strict=True):
        key = owners[index]
        totals[key] = totals.get(key, 0.0) + float(mass)
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0][1].start))
    return tuple(AttendedSpan(s, seg.start, seg.end, m) for (s, seg), m in ranked)
