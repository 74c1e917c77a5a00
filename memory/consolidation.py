"""Plans that rewrite a stream's index: consolidation under a budget, and forgetting.

Pure functions over plain segments and per-segment mean tokens. A plan is a list of recipes, one
per segment of the new index, saying which old segments its tokens come from and how they are
combined; the arena (``memory.arena``) executes it. Keeping the decision apart from the tensor
work is what lets the invariants be property-tested on tiny inputs.

Consolidation, in the spirit of StreamForest's event-memory quota: while the stream holds more
tokens than its target, take the adjacent pair of old segments with the lowest penalty and fold
it into one segment covering both spans.

- ``merge``: penalty ``g * (1 - cos) / 2 + a * age + b * merges`` (StreamForest's weights 0.4,
  0.2, 0.4): ``cos`` is the cosine similarity of the two segments' mean tokens (every adjacent
  pair's in one batched op up front; only pairs a fold creates are computed one by one), ``age`` the
  pair's time centre normalised over the consolidatable history (0 oldest, 1 newest) and
  ``merges`` the pair's merge counts normalised by the largest at the start of the pass. The
  pair's tokens are merged size-weighted down to ``merge_target_tokens``.
- ``thin``: keep the earlier segment's tokens as they are, drop the later one's, and stretch the
  kept span over both. Pairs of the lowest level go first, oldest first, so one pass over level 0
  keeps every other clip before any level-1 segment is thinned again.

Never touched: segments inside the newest window (``end > window_start``) and gaps (a pair never
spans a gap, so gaps are never merged away). When the window alone is over the hard target the
window shrinks, halving the protected segments each round, down to the newest segment alone. If
merging everything mergeable still does not fit (a tiny budget, or history cut into islands by
many gaps) the oldest token segments are evicted: they become gaps with reason ``evicted``. The
budget always wins.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from memory.segments import GAP_EVICTED, GAP_FORGOTTEN, Segment, coalesce_gaps, gap, shifted

Combine = Literal["keep", "merge", "first", "none"]
# Planner steps between two calls of ``pause``.
PAUSE_EVERY = 256
Policy = Literal["merge", "thin"]


@dataclass(frozen=True, slots=True)
class Recipe:
    """One segment of a new index and how its tokens are made from old segments.

    ``keep``: the single source's rows unchanged; ``merge``: the sources' rows (contiguous in the
    old arena) token-merged down to ``segment.count``; ``first``: the first source's rows as they
    are (thinning); ``none``: a gap, no tokens.
    """

    segment: Segment  # in the new index, with its new offset
    sources: tuple[Segment, ...]  # old segments, time order
    combine: Combine


@dataclass(frozen=True, slots=True)
class PenaltyWeights:
    similarity: float = 0.4
    time: float = 0.2
    merge_count: float = 0.4


@dataclass(frozen=True, slots=True)
class ConsolidationPlan:
    recipes: tuple[Recipe, ...]
    tokens: int  # total tokens of the new index
    folded_pairs: int  # pairs merged or thinned
    evicted: int  # token segments turned into gaps
    window_start: float  # the protected window actually kept (after any shrinking)


class _Node:
    """A segment while a plan is being built (mutable, private to the planner)."""

    __slots__ = (
        "alive", "clips", "combine", "count", "end", "index", "kind", "level", "mean", "merges",
        "next", "prev", "reason", "sources", "start", "version",
    )  # fmt: skip

    def __init__(self, seg: Segment, mean: np.ndarray | None, index: int) -> None:
        self.start, self.end, self.count = seg.start, seg.end, seg.count
        self.level, self.kind, self.reason = seg.level, seg.kind, seg.reason
        self.merges, self.clips = seg.merges, seg.clips
        self.mean = mean
        self.sources: list[Segment] = [] if seg.is_gap else [seg]
        self.combine: Combine = "none" if seg.is_gap else "keep"
        self.alive = True
        self.version = 0
        self.index = index
        self.prev, self.next = index - 1, index + 1

    @property
    def is_gap(self) -> bool:
        return self.kind == "gap"


def plan_consolidation(
    segments: Sequence[Segment],
    means: torch.Tensor,
    *,
    target_tokens: int,
    hard_target_tokens: int,
    window_start: float,
    policy: Policy,
    merge_target_tokens: int,
    weights: PenaltyWeights = PenaltyWeights(),  # frozen: a safe default
    pause: Callable[[], None] = lambda: None,
) -> ConsolidationPlan:
    """Plan a new index for one stream holding at most ``hard_target_tokens`` tokens.

    ``segments`` is a valid index (``memory.segments.check_index``); ``means`` [len(segments), H]
    holds each segment's mean token (rows of gaps are ignored). Folding stops at
    ``target_tokens`` (the low-water mark) when the protected window allows it; the window
    shrinks and segments are evicted only as far as ``hard_target_tokens`` requires.
    ``pause`` is called every few hundred steps (a planner thread lets the device thread run).
    """
    rows = means.detach().to("cpu", torch.float32).numpy()  # [S, H], one copy for the pass
    nodes = []
    for i, seg in enumerate(segments):
        nodes.append(_Node(seg, None if seg.is_gap else rows[i], i))
        if i % PAUSE_EVERY == 0:
            pause()
    total = sum(node.count for node in nodes)
    folded = 0
    # cos of every adjacent pair of the input, in one op: [len(segments) - 1]
    adjacent = (
        F.cosine_similarity(torch.from_numpy(rows[:-1]), torch.from_numpy(rows[1:]), dim=1).tolist()
        if policy == "merge" and len(segments) > 1
        else []
    )
    if total > target_tokens:
        total, folded = _fold(
            nodes, total, target_tokens, window_start, policy, merge_target_tokens, weights,
            adjacent, pause,
        )  # fmt: skip
    while total > hard_target_tokens:
        protected = [n for n in _alive(nodes) if n.end > window_start and not n.is_gap]
        if len(protected) <= 1:
            break
        window_start = protected[max(0, len(protected) // 2 - 1)].end
        total, more = _fold(
            nodes, total, hard_target_tokens, window_start, policy, merge_target_tokens, weights,
            adjacent, pause,
        )  # fmt: skip
        folded += more
    evicted = 0
    for node in _alive(nodes):
        if total <= hard_target_tokens:
            break
        if not node.is_gap:
            total -= node.count
            node.count, node.kind, node.reason, node.sources = 0, "gap", GAP_EVICTED, []
            node.level, node.merges, node.clips = 0, 0, 0
            evicted += 1
    return ConsolidationPlan(_recipes(nodes, pause), total, folded, evicted, window_start)


def _alive(nodes: list[_Node]) -> list[_Node]:
    return [n for n in nodes if n.alive]


def _fold(
    nodes: list[_Node],
    total: int,
    target: int,
    window_start: float,
    policy: Policy,
    merge_target: int,
    weights: PenaltyWeights,
    adjacent: list[float],
    pause: Callable[[], None],
) -> tuple[int, int]:
    """Fold the lowest-penalty eligible pairs until ``total <= target``; return (total, folds).

    A heap of candidate pairs with lazy invalidation: a pair is stale once either node changed
    (its ``version``) or died. Normalisation constants are fixed per pass, so a pair's penalty
    depends on the pair alone and stays valid in the heap.
    """
    alive = _alive(nodes)
    eligible = [n for n in alive if not n.is_gap and n.end <= window_start]
    if len(eligible) < 2:
        return total, 0
    t0, t1 = eligible[0].start, max(eligible[-1].end, eligible[0].start + 1e-9)
    max_merges = max(1, max(n.merges for n in eligible))

    def gain(a: _Node, b: _Node) -> int:
        kept = a.count if policy == "thin" else min(a.count + b.count, merge_target)
        return a.count + b.count - kept

    def penalty(a: _Node, b: _Node) -> float:
        age = min(1.0, max(0.0, ((a.start + b.end) / 2 - t0) / (t1 - t0)))
        if policy == "thin":
            return max(a.level, b.level) + 0.5 * age
        if a.version == 0 and b.version == 0:  # both as given: original neighbours
            cos = adjacent[a.index]
        else:
            assert a.mean is not None and b.mean is not None
            cos = _cosine(a.mean, b.mean)
        merges = (a.merges + b.merges) / (2 * max_merges)
        return (
            weights.similarity * (1.0 - cos) / 2 + weights.time * age + weights.merge_count * merges
        )

    def candidate(i: int) -> tuple[float, int, int, int, int] | None:
        j = nodes[i].next
        if j >= len(nodes):
            return None
        a, b = nodes[i], nodes[j]
        if a.is_gap or b.is_gap or b.end > window_start or gain(a, b) <= 0:
            return None
        return (penalty(a, b), i, j, a.version, b.version)

    heap = []
    for k, n in enumerate(eligible):
        if (c := candidate(n.index)) is not None:
            heap.append(c)
        if k % PAUSE_EVERY == 0:
            pause()
    heapq.heapify(heap)
    folds = 0
    while heap and total > target:
        if folds % (PAUSE_EVERY // 8) == 0:
            pause()
        _, i, j, vi, vj = heapq.heappop(heap)
        a, b = nodes[i], nodes[j]
        if not (a.alive and b.alive) or a.version != vi or b.version != vj or a.next != j:
            continue
        total -= gain(a, b)
        _absorb(nodes, i, j, policy, merge_target)
        folds += 1
        for k in (a.prev, i):
            if k >= 0 and (c := candidate(k)) is not None:
                heapq.heappush(heap, c)
    return total, folds


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    """``F.cosine_similarity`` of two vectors, without a tensor op's overhead per call."""
    return float(np.dot(x, y) / math.sqrt(max(float(np.dot(x, x) * np.dot(y, y)), 1e-16)))


def _absorb(nodes: list[_Node], i: int, j: int, policy: Policy, merge_target: int) -> None:
    """Node ``i`` takes over its successor ``j``."""
    a, b = nodes[i], nodes[j]
    if policy == "merge":
        assert a.mean is not None and b.mean is not None
        a.mean = (a.mean * a.count + b.mean * b.count) / (a.count + b.count)
        a.count = min(a.count + b.count, merge_target)
        a.combine = "merge"
    elif a.combine == "keep":
        a.combine = "first"  # thinning keeps the earlier segment's tokens as they are
    a.end = b.end
    a.level = max(a.level, b.level) + 1
    a.merges = max(a.merges, b.merges) + 1
    a.clips += b.clips
    a.kind = "consolidated"
    a.sources.extend(b.sources)
    a.version += 1
    b.alive = False
    a.next = b.next
    if b.next < len(nodes):
        nodes[b.next].prev = i


def _recipes(nodes: list[_Node], pause: Callable[[], None]) -> tuple[Recipe, ...]:
    out: list[Recipe] = []
    offset = 0
    for k, node in enumerate(_alive(nodes)):
        if k % PAUSE_EVERY == 0:
            pause()
        if node.is_gap:
            seg = gap(node.start, node.end, offset, node.reason or GAP_EVICTED)
            if out and out[-1].segment.is_gap and out[-1].segment.reason == seg.reason:
                prev = out[-1].segment
                out[-1] = Recipe(
                    gap(prev.start, seg.end, prev.offset, seg.reason or ""), (), "none"
                )
            else:
                out.append(Recipe(seg, (), "none"))
            continue
        if node.combine == "keep":
            out.append(Recipe(shifted(node.sources[0], offset), tuple(node.sources), "keep"))
        else:
            seg = Segment(
                node.start, node.end, offset, node.count, node.level, "consolidated",
                None, node.merges, node.clips,
            )  # fmt: skip
            out.append(Recipe(seg, tuple(node.sources), node.combine))
        offset += node.count
    return tuple(out)


def plan_forget(segments: Sequence[Segment], start: float, end: float) -> tuple[Recipe, ...] | None:
    """Plan removing ``[start, end)`` from an index; ``None`` when it misses the history.

    A token segment that overlaps the interval at all is removed whole (its tokens cannot be
    split by time, and privacy errs on the side of removal), so the recorded ``forgotten`` gap
    spans the interval widened to those segments. Gaps inside are replaced; gaps cut by it are
    trimmed. The interval is clamped to the history.
    """
    if not segments:
        return None
    lo, hi = max(start, segments[0].start), min(end, segments[-1].end)
    if not hi > lo:
        return None
    for seg in segments:
        if not seg.is_gap and seg.end > lo and seg.start < hi:
            lo, hi = min(lo, seg.start), max(hi, seg.end)
    before: list[Segment] = []
    after: list[Segment] = []
    for seg in segments:
        if seg.end <= lo:
            before.append(seg)
        elif seg.start >= hi:
            after.append(seg)
        elif seg.is_gap:
            if seg.start < lo:
                before.append(gap(seg.start, lo, seg.offset, seg.reason or ""))
            if seg.end > hi:
                after.append(gap(hi, seg.end, seg.offset, seg.reason or ""))
    index = coalesce_gaps([*before, gap(lo, hi, 0, GAP_FORGOTTEN), *after])
    recipes: list[Recipe] = []
    offset = 0
    for seg in index:
        if seg.is_gap:
            recipes.append(Recipe(shifted(seg, offset), (), "none"))
        else:
            recipes.append(Recipe(shifted(seg, offset), (seg,), "keep"))
            offset += seg.count
    return tuple(recipes)


def recipes_tokens(recipes: Sequence[Recipe]) -> int:
    """Total tokens of the index a plan builds."""
    return sum(r.segment.count for r in recipes)


def segment_means(tokens: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """Mean token of each segment: [len(segments), H] float32 (zeros for gaps).

    ``tokens`` [N, H] are the packed arena rows the segments index.
    """
    n, hidden = len(segments), tokens.shape[1]
    counts = torch.tensor([s.count for s in segments], dtype=torch.long)
    if int(counts.sum()) == 0:
        return torch.zeros(n, hidden, dtype=torch.float32)
    owner = torch.repeat_interleave(torch.arange(n), counts).to(tokens.device)  # [N]
    sums = torch.zeros(n, hidden, dtype=torch.float32, device=tokens.device)
    sums.index_add_(0, owner, tokens[: int(counts.sum())].to(torch.float32))
    return (sums / counts.clamp_min(1).to(sums.device)[:, None]).cpu()
