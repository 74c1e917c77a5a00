"""One final answer from the parts several owners gave (pure: no Redis, no clock).

A coordinator asks each owner about its own streams; what comes back is a list of
:class:`Part` — an owner's final answer, an owner's error, or streams nobody owns. The merged
answer keeps one section per part in the order of the requested streams, the evidence of all
parts in time order, every part's gaps plus one ``no_owner`` gap per stream without an owner (so
no stream is silently left out), and the coordinator's id in ``daemon``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sinks.schema import MAX_EVIDENCE_FRAMES, Answer, GapSpan, HistorySpan, Section

NO_OWNER = "no_owner"  # error code of a section, and reason of a gap, for an unowned stream


@dataclass(frozen=True, slots=True)
class Part:
    """What one owner (or nobody) said about some of the requested streams."""

    streams: tuple[str, ...]
    daemon: str | None  # the owner; None: the streams have no live owner
    answer: Answer | None = None  # its final answer, when it gave one
    error: str | None = None  # else an error code (no_owner, timeout, an owner's error code)
    message: str | None = None

    @classmethod
    def unowned(cls, streams: Sequence[str], waited_s: float) -> Part:
        return cls(
            tuple(streams),
            None,
            error=NO_OWNER,
            message=f"no live daemon owned it within {waited_s:g} s",
        )


def merge_parts(
    request_id: str,
    question: str,
    streams: Sequence[str],
    parts: Sequence[Part],
    *,
    coordinator: str,
    window: tuple[float | None, float | None],
    latency_s: float,
    now: float,
) -> Answer:
    """The one final answer of a request over ``streams`` from its owners' ``parts``.

    ``window`` is the request's (since, until) in epoch seconds (None: open end): the span a
    part without an answer is a gap over. ``now`` closes an open window. Parts are ordered by
    the position of their first stream in ``streams``.
    """
    order = {name: index for index, name in enumerate(streams)}
    ordered = sorted(parts, key=lambda p: min(order.get(s, len(order)) for s in p.streams))
    answered = [p for p in ordered if p.answer is not None]
    answers = [p.answer for p in answered if p.answer is not None]
    history = _union_history(answers)
    gap_start, gap_end = _gap_window(window, history, now)
    gaps = [gap for answer in answers for gap in answer.gaps]
    for part in ordered:
        if part.answer is None:
            reason = part.error or "no_answer"
            gaps.extend(
                GapSpan(stream=name, start=gap_start, end=gap_end, reason=reason)
                for name in part.streams
            )
    return Answer(
        id=request_id,
        stream=tuple(name for answer in answers for name in answer.stream),
        question=question,
        answer=_merged_text(ordered),
        evidence=tuple(span for answer in answers for span in answer.evidence),
        attended=tuple(span for answer in answers for span in answer.attended),
        frames=sum(answer.frames for answer in answers),
        history=history,
        gaps=tuple(sorted(gaps, key=lambda g: (g.start, g.end, g.stream))),
        static=tuple(
            sorted(
                (span for answer in answers for span in answer.static),
                key=lambda s: (s.start, s.end, s.stream),
            )
        ),
        latency_s=max(0.0, latency_s),
        ttft_s=min((a.ttft_s for a in answers if a.ttft_s is not None), default=None),
        tokens=sum(answer.tokens for answer in answers),
        model=", ".join(dict.fromkeys(answer.model for answer in answers)) or "none",
        evidence_frames=tuple(
            sorted(
                (frame for answer in answers for frame in answer.evidence_frames),
                key=lambda f: (f.start, f.end, f.stream),
            )[:MAX_EVIDENCE_FRAMES]
        ),
        daemon=coordinator,
        sections=tuple(_section(part) for part in ordered),
    )


def _section(part: Part) -> Section:
    if part.answer is not None:
        return Section(
            stream=part.streams,
            daemon=part.daemon,
            answer=part.answer.answer,
            frames=part.answer.frames,
            latency_s=part.answer.latency_s,
        )
    return Section(stream=part.streams, daemon=part.daemon, error=part.error, message=part.message)


def _merged_text(parts: Sequence[Part]) -> str:
    """The answer text: a lone answer as it is, else one labelled line per section."""
    if len(parts) == 1 and parts[0].answer is not None:
        return parts[0].answer.answer
    lines = []
    for part in parts:
        label = ", ".join(part.streams)
        if part.answer is not None:
            lines.append(f"[{label}] {part.answer.answer}")
        else:
            why = part.message or part.error or "no answer"
            lines.append(f"[{label}] ({part.error or 'no_answer'}: {why})")
    return "\n".join(lines)


def _union_history(answers: Sequence[Answer]) -> HistorySpan | None:
    spans = [a.history for a in answers if a.history is not None]
    if not spans:
        return None
    return HistorySpan(start=min(s.start for s in spans), end=max(s.end for s in spans))


def _gap_window(
    window: tuple[float | None, float | None], history: HistorySpan | None, now: float
) -> tuple[float, float]:
    """The span a stream without an answer is missing over: the request's window, closed."""
    since, until = window
    end = until if until is not None else now
    start = since if since is not None else (history.start if history is not None else end)
    return min(start, end), end
