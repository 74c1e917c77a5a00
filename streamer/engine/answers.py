"""Answers: the text streamed as tokens come, and the final answer with what it read.

``IncrementalText`` turns token ids into text pieces without re-decoding the whole answer at
every token (O(n) overall, not O(n²)): it decodes a short window behind the newest token and
holds a piece back while it ends in an incomplete character (a byte-level tokenizer splits
UTF-8 characters across tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from memory.segments import Segment
from model.prompt import Tokenizer
from streamer.engine.planner import QueryPlan
from streamer.engine.types import Answer, AttendedSpan, GapSpan, Span, Ticket

_REPLACEMENT = "\ufffd"
# Tokens decoded again before the new ones, so a tokenizer that merges across token
# boundaries (spaces, multi-byte characters) gives the same text as decoding everything.
_CONTEXT_TOKENS = 6


class IncrementalText:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text has been emitted
        self.text = ""

    def push(self, token: int, *, final: bool = False) -> str:
        """Add one token; return the new text it completes ('' while a character is open)."""
        self._ids.append(token)
        return self._emit(final)

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._emit(True) if self._read < len(self._ids) else ""

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        done = decode(self._ids[self._prefix : self._read])
        now = decode(self._ids[self._prefix :])
        if (now.endswith(_REPLACEMENT) and not final) or len(now) <= len(done):
            return ""
        if not now.startswith(done):
            return ""  # the window re-segmented earlier text; wait for more tokens
        piece = now[len(done) :]
        self._read = len(self._ids)
        self._prefix = max(0, self._read - _CONTEXT_TOKENS)
        self.text += piece
        return piece


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
