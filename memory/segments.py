"""The time index of one stream's memory: segments, and the invariants every index keeps.

A segment is a span of stream time ``[start, end)`` (seconds) and the tokens that stand for it:
rows ``[offset, offset + count)`` of the stream's arena. Segments are kept in time order, their
token rows in the same order and packed from row 0, so a run of segments is one slice of the arena.
A gap is a segment with no tokens (``count == 0``) whose ``offset`` is where its tokens would be.
A static segment is a token segment over whose span, from ``static_from`` to its end, the motion
gate saw no change: its tokens (one clip's) stand for the whole span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

SegmentKind = Literal["clip", "consolidated", "gap", "static"]

GAP_UNRECORDED = "unrecorded"  # a hole between clips that ingest did not report
GAP_FORGOTTEN = "forgotten"  # removed on request (privacy)
GAP_EVICTED = "evicted"  # dropped because nothing else could free room (tiny budget, many gaps)

# Spans are float seconds; two ends closer than this are the same instant.
TIME_EPS_S = 1e-6


@dataclass(frozen=True, slots=True)
class Segment:
    """One entry of the index. ``level`` 0 is one clip as encoded; each consolidation adds one."""

    start: float  # seconds, inclusive
    end: float  # seconds, exclusive
    offset: int  # first arena row
    count: int  # arena rows (tokens); 0 for a gap
    level: int = 0
    kind: SegmentKind = "clip"
    reason: str | None = None  # gaps only: "disconnected", "stalled", "forgotten", ...
    merges: int = 0  # consolidations this segment went through (StreamForest's merge count)
    clips: int = 1  # clips of level 0 folded into it (0 for a gap)
    static_from: float | None = None  # static only: no change from here to ``end``

    @property
    def is_gap(self) -> bool:
        return self.kind == "gap"

    @property
    def is_static(self) -> bool:
        return self.kind == "static"

    @property
    def duration(self) -> float:
        return self.end - self.start


def gap(start: float, end: float, offset: int, reason: str) -> Segment:
    """A gap segment: a span with no tokens."""
    return Segment(start, end, offset, 0, level=0, kind="gap", reason=reason, clips=0)


def shifted(segment: Segment, offset: int) -> Segment:
    """The same segment at another arena row."""
    return segment if segment.offset == offset else replace(segment, offset=offset)


def check_index(segments: Sequence[Segment], total_tokens: int) -> None:
    """Raise ``ValueError`` naming the first broken invariant of an index.

    Invariants: spans are non-empty, time-ordered, non-overlapping and contiguous (segment spans
    plus gap spans cover the history from the first start to the last end); token rows are packed
    in time order from row 0; gaps hold no tokens and token segments hold some; the counts add up
    to ``total_tokens``.
    """
    offset = 0
    previous_end: float | None = None
    for i, seg in enumerate(segments):
        if not seg.end > seg.start:
            raise ValueError(f"segment {i} has an empty span [{seg.start}, {seg.end})")
        if previous_end is not None and abs(seg.start - previous_end) > TIME_EPS_S:
            raise ValueError(
                f"segment {i} starts at {seg.start} but the previous one ends at {previous_end}"
            )
        if seg.offset != offset:
            raise ValueError(f"segment {i} is at row {seg.offset}, expected {offset}")
        if seg.is_gap != (seg.count == 0):
            raise ValueError(f"segment {i} ({seg.kind}) has {seg.count} tokens")
        if seg.level < 0 or seg.merges < 0 or seg.clips < 0:
            raise ValueError(f"segment {i} has a negative level, merge or clip count")
        if seg.is_static != (seg.static_from is not None) or (
            seg.static_from is not None and not seg.start <= seg.static_from < seg.end
        ):
            raise ValueError(f"segment {i} ({seg.kind}) has static_from {seg.static_from}")
        offset += seg.count
        previous_end = seg.end
    if offset != total_tokens:
        raise ValueError(f"the index holds {offset} tokens but the arena {total_tokens}")


def relabel_gaps(
    segments: Sequence[Segment], start: float, end: float, reason: str, *, only: str
) -> list[Segment]:
    """Give the parts of gaps with reason ``only`` inside ``[start, end)`` the reason ``reason``.

    Used when ingest reports an outage after the bank already recorded the hole as unrecorded.
    Gaps are split where the interval cuts them; other segments are unchanged.
    """
    out: list[Segment] = []
    for seg in segments:
        if not seg.is_gap or seg.reason != only or seg.end <= start or seg.start >= end:
            out.append(seg)
            continue
        lo, hi = max(seg.start, start), min(seg.end, end)
        if lo > seg.start:
            out.append(gap(seg.start, lo, seg.offset, only))
        out.append(gap(lo, hi, seg.offset, reason))
        if hi < seg.end:
            out.append(gap(hi, seg.end, seg.offset, only))
    return coalesce_gaps(out)


def coalesce_gaps(segments: Sequence[Segment]) -> list[Segment]:
    """Join consecutive gaps with the same reason into one (the index stays short in outages)."""
    out: list[Segment] = []
    for seg in segments:
        if out and seg.is_gap and out[-1].is_gap and out[-1].reason == seg.reason:
            out[-1] = replace(out[-1], end=seg.end)
        else:
            out.append(seg)
    return out


def static_spans(
    segments: Sequence[Segment], start: float | None = None, end: float | None = None
) -> list[tuple[float, float]]:
    """Spans without change inside ``[start, end)`` (either side open when ``None``), time order.

    Touching static parts (a static stretch cut by keep-alive encodes) form one span.
    """
    spans: list[tuple[float, float]] = []
    for seg in segments:
        if seg.static_from is None:
            continue
        lo, hi = seg.static_from, seg.end
        if start is not None:
            lo = max(lo, start)
        if end is not None:
            hi = min(hi, end)
        if not hi > lo:
            continue
        if spans and lo - spans[-1][1] <= TIME_EPS_S:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    return spans
