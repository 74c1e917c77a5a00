"""One stream's memory: its arena, its index, and the rules for appending, gaps and forgetting.

Not thread-safe by itself: ``memory.bank.MemoryBank`` holds the lock around every call.

Consolidation runs one of two ways, with the same result: inline, when an append finds the share
full (plan and write at once), or as maintenance, started earlier (``consolidate_at``): the plan
is computed off the device thread (``plan_inputs`` then the pure planner on a worker), and
written in bounded steps (``commit_step``) between engine steps while appends go on. Any other
change of the index (a forget, a gap relabel, a share change) first finishes a commit in
progress (``settle``), and a plan made before such a change is dropped.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from memory.arena import PlanCommit, TokenArena
from memory.consolidation import (
    ConsolidationPlan,
    PenaltyWeights,
    Policy,
    Recipe,
    plan_consolidation,
    plan_forget,
    segment_means,
)
from memory.errors import MemoryStoreError
from memory.means import MeanStore, MeanTable
from memory.segments import (
    GAP_UNRECORDED,
    TIME_EPS_S,
    Segment,
    coalesce_gaps,
    gap,
    relabel_gaps,
    shifted,
)
from memory.settings import MemorySettings
from memory.snapshot import segment_key
from memory.view import MemoryView

# Rows per step when a commit is finished at once: bounds the merge temporaries, not the time.
SETTLE_STEP_ROWS = 1 << 16


@dataclass(frozen=True, slots=True)
class PlanInputs:
    """What the pure planner needs, taken on the device thread (no tensor work, no per-segment
    Python: the index and the means are copied as they are, in C)."""

    segments: tuple[Segment, ...]
    means: MeanTable  # cached mean token [H] float32 per token segment
    hidden_size: int
    target_tokens: int
    hard_target_tokens: int
    window_start: float
    policy: Policy
    merge_target_tokens: int
    weights: PenaltyWeights
    structure: int  # the index's structure version the plan is valid for

    def plan(self, pause: Callable[[], None] = lambda: None) -> ConsolidationPlan:
        """Run the planner (pure; any thread; ``pause`` is called every few hundred steps)."""
        zeros = torch.zeros(self.hidden_size, dtype=torch.float32)
        rows = []
        for k, seg in enumerate(self.segments):
            mean = None if seg.is_gap else self.means.get(segment_key(seg))
            rows.append(zeros if mean is None else mean.to("cpu"))
            if k % 1024 == 0:
                pause()
        means = torch.stack(rows) if rows else zeros[None]
        return plan_consolidation(
            self.segments,
            means,
            target_tokens=self.target_tokens,
            hard_target_tokens=self.hard_target_tokens,
            window_start=self.window_start,
            policy=self.policy,
            merge_target_tokens=self.merge_target_tokens,
            weights=self.weights,
            pause=pause,
        )


def yield_gil() -> None:
    """Let other threads run now (a planner thread calls it so the device thread never waits
    long for the interpreter lock)."""
    time.sleep(0)


@dataclass(slots=True)
class _Committing:
    plan: ConsolidationPlan
    commit: PlanCommit
    new_in_index: int  # leading entries of ``segments`` that are the plan's new segments
    old_left: int  # old segments after them, not yet rewritten (appended ones follow)


class StreamMemory:
    """The arena and index of one stream, kept within ``capacity`` tokens."""

    def __init__(
        self,
        name: str,
        capacity: int,
        settings: MemorySettings,
        *,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.name = name
        self.settings = settings
        self.arena = TokenArena(capacity, hidden_size, dtype, device)
        self.segments: list[Segment] = []
        self.version = 0  # bumped by every change of the index
        self.saved_version = -1  # version last written to a snapshot
        self.consolidations = 0
        self.folded_pairs = 0
        self.evicted = 0
        self.window_start: float | None = None  # protected window at the last consolidation
        self._frozen: tuple[Segment, ...] | None = ()  # the index as a tuple, until it changes
        self._means = MeanStore(hidden_size, torch.device(device))  # per token segment
        self._structure = 0  # bumped by every change but an append: plans made before go stale
        self._committing: _Committing | None = None
        self._idle_until_above = -1  # a pass that freed nothing: wait for the stream to grow
        self._weights = PenaltyWeights(
            settings.similarity_weight, settings.time_weight, settings.merge_count_weight
        )

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    @property
    def tokens(self) -> int:
        return self.arena.used

    @property
    def last_end(self) -> float | None:
        return self.segments[-1].end if self.segments else None

    # ---- writes ---------------------------------------------------------------------------

    def append_clip(
        self, tokens: torch.Tensor, start: float, end: float, *, static: bool = False
    ) -> None:
        """Append one clip's tokens [n, H] covering ``[start, end)`` seconds.

        ``static``: the motion gate saw no change in it (a keep-alive encode): a static segment.
        """
        _check_times(start, end)
        if tokens.ndim != 2 or tokens.shape[1] != self.arena.hidden_size or tokens.shape[0] < 1:
            raise MemoryStoreError(
                f"{self.name}: expected tokens [n, {self.arena.hidden_size}], got "
                f"{list(tokens.shape)}"
            )
        n = tokens.shape[0]
        if n > self.capacity:
            raise MemoryStoreError(
                f"{self.name}: a clip of {n} tokens exceeds the stream's share of "
                f"{self.capacity} tokens; raise memory.budget_mb"
            )
        last = self.last_end
        if last is not None:
            if end <= last + TIME_EPS_S:
                raise MemoryStoreError(
                    f"{self.name}: clip [{start}, {end}) is not newer than the memory (ends {last})"
                )
            if start - last > self.settings.gap_tolerance_s:
                self._push(gap(last, start, self.arena.used, GAP_UNRECORDED))
            else:
                start = last  # absorb jitter and overlap: spans stay contiguous
        if self.arena.used + n > self.capacity:
            self.settle()
        if self.arena.used + n > self.capacity:
            self._make_room(incoming=n, newest_end=end)
        offset = self.arena.append(tokens)
        if static:
            seg = Segment(start, end, offset, n, kind="static", static_from=start)
        else:
            seg = Segment(start, end, offset, n)
        self._means.put_mean(segment_key(seg), tokens)
        self._push(seg)

    def extend_static(self, start: float, end: float) -> None:
        """Stretch the newest token segment over ``[start, end)``, a span without change.

        The segment becomes ``static`` from its old end (or keeps its ``static_from``). Raises
        ``MemoryStoreError`` when there is nothing to extend: no history, a gap as the newest
        segment (a static span is never merged into a gap), or a hole before ``start`` longer
        than ``gap_tolerance_s``; the span is then simply not recorded.
        """
        _check_times(start, end)
        last = self.segments[-1] if self.segments else None
        if last is None or last.is_gap:
            raise MemoryStoreError(
                f"{self.name}: static span [{start}, {end}) has no segment to extend"
            )
        if end <= last.end + TIME_EPS_S:
            raise MemoryStoreError(
                f"{self.name}: static span [{start}, {end}) is not newer than the memory "
                f"(ends {last.end})"
            )
        if start - last.end > self.settings.gap_tolerance_s:
            raise MemoryStoreError(
                f"{self.name}: static span [{start}, {end}) does not continue the memory "
                f"(ends {last.end})"
            )
        static_from = last.static_from if last.static_from is not None else last.end
        extended = replace(last, end=end, kind="static", static_from=static_from)
        mean = self._means.get(segment_key(last))  # the same rows under their new key
        if mean is not None:
            self._means.put(segment_key(extended), mean)
            self._means.pop(segment_key(last))
        self.segments[-1] = extended
        self._changed()

    def add_gap(self, start: float, end: float, reason: str) -> None:
        """Record ``[start, end)`` as not seen, with ``reason``.

        A part before the newest end can only relabel holes recorded as ``unrecorded`` (ingest
        often reports an outage after the next clip arrived); the rest extends the history.
        """
        _check_times(start, end, allow_empty=True)
        if not end > start:
            return
        last = self.last_end
        if last is None:
            self._push(gap(start, end, 0, reason))
            return
        if start < last:
            self.settle()
            self._relabel(start, min(end, last), reason)
            start = last
        if not end > start:
            return
        if start - last > self.settings.gap_tolerance_s:
            self._push(gap(last, start, self.arena.used, GAP_UNRECORDED))
        else:
            start = last
        self._push(gap(start, end, self.arena.used, reason))

    def forget(self, start: float, end: float) -> bool:
        """Remove ``[start, end)`` (widened to whole segments); return whether anything changed."""
        _check_times(start, end, allow_empty=True)
        self.settle()
        recipes = plan_forget(self.segments, start, end)
        if recipes is None:
            return False
        old_used = self.arena.used
        self._apply(recipes)
        self.arena.clear_free_rows(old_used)
        return True

    def set_capacity(self, capacity: int) -> None:
        """Fit the history into a new share (consolidating if it shrank), then resize the arena."""
        if capacity == self.capacity:
            return
        self.settle()
        self._structure += 1
        if self.arena.used > capacity:
            self._make_room(incoming=0, newest_end=self.last_end or 0.0, capacity=capacity)
        self.arena.resize(capacity)
        self.version += 1

    def load(self, segments: list[Segment], tokens: torch.Tensor, sizes: torch.Tensor) -> None:
        """Replace the contents (restore); consolidates at once if the share is now smaller."""
        share = self.capacity
        self._committing = None  # everything is replaced
        self._structure += 1
        if tokens.shape[0] > share:
            self.arena.resize(tokens.shape[0])
        self.arena.load(tokens, sizes)
        self.segments = list(segments)
        self._means.clear()
        if self.segments:
            means = segment_means(self.arena.storage[: self.arena.used], self.segments)
            for seg, mean in zip(self.segments, means.to(self.arena.device), strict=True):
                if not seg.is_gap:
                    self._means.put(segment_key(seg), mean)
        self._changed()
        if self.arena.used > share:
            self._make_room(incoming=0, newest_end=self.last_end or 0.0, capacity=share)
        if self.capacity != share:
            self.arena.resize(share)

    # ---- consolidation as maintenance -----------------------------------------------------

    def consolidation_due(self) -> bool:
        """Whether the stream passed ``consolidate_at`` of its share and no commit is running."""
        fraction = max(self.settings.consolidate_at, self.settings.consolidate_to)
        at = math.floor(self.capacity * fraction)
        used = self.arena.used
        return self._committing is None and used >= at and used > self._idle_until_above

    @property
    def committing(self) -> bool:
        return self._committing is not None

    def plan_inputs(self) -> PlanInputs:
        """Everything the planner needs for a pass down to ``consolidate_to`` (no tensor work)."""
        capacity = self.capacity
        low_water = min(capacity, math.floor(capacity * self.settings.consolidate_to))
        return PlanInputs(
            segments=tuple(self.segments),
            means=self._means.snapshot(),
            hidden_size=self.arena.hidden_size,
            target_tokens=low_water,
            hard_target_tokens=capacity,
            window_start=(self.last_end or 0.0) - self.settings.recent_window_s,
            policy=self.settings.policy,
            merge_target_tokens=self.settings.merge_target_tokens,
            weights=self._weights,
            structure=self._structure,
        )

    def start_commit(self, inputs: PlanInputs, plan: ConsolidationPlan) -> bool:
        """Begin writing ``plan``; False (dropped) if the index changed other than by appends."""
        if inputs.structure != self._structure or self._committing is not None:
            return False
        self._committing = _Committing(
            plan, PlanCommit(self.arena, plan.recipes), 0, len(inputs.segments)
        )
        return True

    def commit_step(self, max_rows: int) -> bool:
        """Write about ``max_rows`` more rows of the plan in progress; True when it is done."""
        state = self._committing
        if state is None:
            return True
        recipes = state.plan.recipes
        if not recipes:
            self._finish_commit(state)
            self._changed()
            return True
        k0 = state.commit.next
        merged = state.commit.step(max_rows)
        k1 = state.commit.next
        for i, tokens in merged.items():
            self._means.put_mean(segment_key(recipes[i].segment), tokens)
        for recipe in recipes[k0:k1]:
            if recipe.combine == "first":  # thinning keeps the first source's rows
                mean = self._means.get(segment_key(recipe.sources[0]))
                if mean is not None:
                    self._means.put(segment_key(recipe.segment), mean)
            if recipe.combine in ("merge", "first"):  # the sources leave the index
                for source in recipe.sources:
                    self._means.pop(segment_key(source))
        # the old segments the written recipes stand for leave the index
        cut = recipes[k1 - 1].segment.end
        first_old = state.new_in_index  # == k0
        consumed = 0
        while (
            consumed < state.old_left
            and self.segments[first_old + consumed].end <= cut + TIME_EPS_S
        ):
            consumed += 1
        self.segments[first_old : first_old + consumed] = [r.segment for r in recipes[k0:k1]]
        state.new_in_index, state.old_left = k1, state.old_left - consumed
        if state.commit.done:
            self._finish_commit(state)
        self._changed()
        return self._committing is None

    def settle(self) -> None:
        """Finish a commit in progress at once (before any change that is not an append)."""
        while self._committing is not None:
            self.commit_step(SETTLE_STEP_ROWS)

    def _finish_commit(self, state: _Committing) -> None:
        """Move what was appended during the commit down behind the new rows."""
        commit, plan = state.commit, state.plan
        appended = self.arena.used - commit.old_used
        shift = commit.new_used - commit.old_used
        # Rows past the new end still hold old segments that earlier views may read; the move
        # below and the next appends overwrite them.
        self.arena._notify(commit.new_used, self.arena.used)
        if appended:
            self.arena._move(commit.old_used, commit.new_used, appended)
        tail = [shifted(s, s.offset + shift) for s in self.segments[state.new_in_index :]]
        self.segments = self.segments[: state.new_in_index] + tail
        self.arena.used = commit.new_used + appended
        self._committing = None
        self._structure += 1
        if len(self._means) > 2 * len(self.segments) + 64:  # evictions leave some behind
            self._means.keep_only({segment_key(s) for s in self.segments if not s.is_gap})
        fraction = max(self.settings.consolidate_at, self.settings.consolidate_to)
        still_due = self.arena.used >= math.floor(self.capacity * fraction)
        self._idle_until_above = self.arena.used if still_due else -1
        self.consolidations += 1
        self.folded_pairs += plan.folded_pairs
        self.evicted += plan.evicted
        self.window_start = plan.window_start

    # ---- reads ----------------------------------------------------------------------------

    def view(self, lock: threading.RLock) -> MemoryView:
        if self._frozen is None:
            self._frozen = tuple(self.segments)
        view = MemoryView(self.name, self._frozen, self.version, self.arena.storage, lock)
        self.arena.watch(view)
        return view

    # ---- internals ------------------------------------------------------------------------

    def _push(self, seg: Segment) -> None:
        prev = self.segments[-1] if self.segments else None
        if prev is not None and seg.is_gap and prev.is_gap and prev.reason == seg.reason:
            if self._committing is not None:
                self.settle()  # the gap to extend may be one the commit still rewrites
                prev = self.segments[-1]
            self._structure += 1
            self.segments[-1] = gap(prev.start, seg.end, prev.offset, seg.reason or "")
        else:
            self.segments.append(seg)
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._frozen = None

    def _relabel(self, start: float, end: float, reason: str) -> None:
        i = max(0, bisect.bisect_right(self.segments, start, key=lambda s: s.end) - 1)
        tail = self.segments[i:]
        if any(s.is_gap and s.reason == GAP_UNRECORDED for s in tail):
            self.segments[i:] = relabel_gaps(tail, start, end, reason, only=GAP_UNRECORDED)
            self.segments = coalesce_gaps(self.segments)
            self._structure += 1
            self._changed()

    def _make_room(self, *, incoming: int, newest_end: float, capacity: int | None = None) -> None:
        """Consolidate so that ``incoming`` more tokens fit in ``capacity`` (default: the share)."""
        self.settle()
        capacity = self.capacity if capacity is None else capacity
        hard = capacity - incoming
        low_water = min(
            hard, max(0, math.floor(capacity * self.settings.consolidate_to) - incoming)
        )
        inputs = PlanInputs(
            segments=tuple(self.segments),
            means=self._means_of_all(),
            hidden_size=self.arena.hidden_size,
            target_tokens=low_water,
            hard_target_tokens=hard,
            window_start=newest_end - self.settings.recent_window_s,
            policy=self.settings.policy,
            merge_target_tokens=self.settings.merge_target_tokens,
            weights=self._weights,
            structure=self._structure,
        )
        started = self.start_commit(inputs, inputs.plan())
        assert started, "no commit can be running after settle()"
        self.settle()

    def _means_of_all(self) -> MeanTable:
        """The cached means, completed for any token segment lacking one (not expected)."""
        for seg in self.segments:
            key = segment_key(seg)
            if not seg.is_gap and key not in self._means:
                self._means.put_mean(key, self.arena.storage[seg.offset : seg.offset + seg.count])
        return self._means.snapshot()

    def _apply(self, recipes: tuple[Recipe, ...]) -> None:
        self.arena.apply(recipes)
        self.segments = [r.segment for r in recipes]
        self._structure += 1
        self._means.keep_only({segment_key(s) for s in self.segments if not s.is_gap})
        self._changed()


def _check_times(start: float, end: float, *, allow_empty: bool = False) -> None:
    if not (math.isfinite(start) and math.isfinite(end)):
        raise MemoryStoreError(f"span [{start}, {end}) is not finite")
    if end < start or (end == start and not allow_empty):
        raise MemoryStoreError(f"span [{start}, {end}) ends before it starts")
