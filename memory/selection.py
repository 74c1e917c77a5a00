"""Which segments a query reads: uniform over a time range, under a token budget (pure)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from memory.segments import Segment
from memory.view import MemoryView


def select_segments(
    view_or_segments: MemoryView | Sequence[Segment],
    *,
    since: float | None = None,
    until: float | None = None,
    token_budget: int,
) -> list[Segment]:
    """Token segments overlapping ``[since, until)``, time order, at most ``token_budget`` tokens.

    ``view_or_segments`` is a ``MemoryView`` or a time-ordered sequence of segments. When
    everything in the range fits it is all returned. Otherwise, as the model's own uniform frame
    sampling does, ``k`` instants are spread evenly over the range (the centres of ``k`` equal
    parts) and each picks the segment under it (or the nearest token segment, when it falls in a
    gap); ``k`` is the largest count whose distinct picks fit the budget. A consolidated segment
    covers a longer span, so it is picked by more instants but read once. Gaps are never returned
    (``MemoryView.gaps`` lists them). Empty when nothing overlaps or the budget is below the
    smallest segment.
    """
    segments: Sequence[Segment] = (
        view_or_segments.segments if isinstance(view_or_segments, MemoryView) else view_or_segments
    )
    if token_budget < 1:
        return []
    # segments are time-ordered: find the range by bisection, then drop the gaps in it
    first = 0 if since is None else bisect.bisect_right(segments, since, key=lambda s: s.end)
    last = (
        len(segments)
        if until is None
        else bisect.bisect_left(segments, until, lo=first, key=lambda s: s.start)
    )
    candidates = [s for s in segments[first:last] if not s.is_gap]
    if not candidates:
        return []
    if sum(s.count for s in candidates) <= token_budget:
        return candidates
    lo = candidates[0].start if since is None else max(since, candidates[0].start)
    starts = [s.start for s in candidates]
    hi = candidates[-1].end if until is None else min(until, candidates[-1].end)
    best: list[Segment] = []
    # Start from as many instants as the budget holds of the smallest segment; grow while the
    # picks still fit (long consolidated segments absorb several instants each).
    limit = len(candidates)
    k = max(1, min(limit, token_budget // min(s.count for s in candidates)))
    while (
        k < limit and _tokens(_pick(candidates, starts, lo, hi, min(limit, 2 * k))) <= token_budget
    ):
        k = min(limit, 2 * k)
    low, high = 1, min(limit, 2 * k)
    while low <= high:  # binary search for the largest k that fits
        k = (low + high) // 2
        picked = _pick(candidates, starts, lo, hi, k)
        if _tokens(picked) <= token_budget:
            best, low = picked, k + 1
        else:
            high = k - 1
    return best


def _pick(
    candidates: Sequence[Segment], starts: list[float], lo: float, hi: float, k: int
) -> list[Segment]:
    """Distinct segments under ``k`` evenly spread instants of ``[lo, hi)``, time order."""
    chosen: list[int] = []
    for i in range(k):
        t = lo + (i + 0.5) * (hi - lo) / k
        j = max(0, bisect.bisect_right(starts, t) - 1)  # last candidate starting at or before t
        in_gap = candidates[j].end <= t and j + 1 < len(candidates)
        if in_gap and candidates[j + 1].start - t < t - candidates[j].end:
            j += 1  # t falls in a gap after candidate j: take the nearer neighbour
        if not chosen or chosen[-1] != j:
            chosen.append(j)
    return [candidates[j] for j in chosen]


def _tokens(segments: Sequence[Segment]) -> int:
    return sum(s.count for s in segments)
