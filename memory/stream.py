"""One stream's memory: its arena, its index, and the rules for appending, gaps and forgetting.

Not thread-safe by itself: ``memory.bank.MemoryBank`` holds the lock around every call.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import replace

import torch

from memory.arena import TokenArena
from memory.consolidation import (
    PenaltyWeights,
    Recipe,
    plan_consolidation,
    plan_forget,
    segment_means,
)
from memory.segments import (
    GAP_UNRECORDED,
    TIME_EPS_S,
    Segment,
    coalesce_gaps,
    gap,
    relabel_gaps,
)
from memory.settings import MemorySettings
from memory.view import MemoryView
from model.errors import MemoryStoreError


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
            self._make_room(incoming=n, newest_end=end)
        offset = self.arena.append(tokens)
        if static:
            self._push(Segment(start, end, offset, n, kind="static", static_from=start))
        else:
            self._push(Segment(start, end, offset, n))

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
        self.segments[-1] = replace(last, end=end, kind="static", static_from=static_from)
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
        if self.arena.used > capacity:
            self._make_room(incoming=0, newest_end=self.last_end or 0.0, capacity=capacity)
        self.arena.resize(capacity)
        self.version += 1

    def load(self, segments: list[Segment], tokens: torch.Tensor, sizes: torch.Tensor) -> None:
        """Replace the contents (restore); consolidates at once if the share is now smaller."""
        share = self.capacity
        if tokens.shape[0] > share:
            self.arena.resize(tokens.shape[0])
        self.arena.load(tokens, sizes)
        self.segments = list(segments)
        self._changed()
        if self.arena.used > share:
            self._make_room(incoming=0, newest_end=self.last_end or 0.0, capacity=share)
        if self.capacity != share:
            self.arena.resize(share)

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
            self._changed()

    def _make_room(self, *, incoming: int, newest_end: float, capacity: int | None = None) -> None:
        """Consolidate so that ``incoming`` more tokens fit in ``capacity`` (default: the share)."""
        capacity = self.capacity if capacity is None else capacity
        hard = capacity - incoming
        low_water = min(
            hard, max(0, math.floor(capacity * self.settings.consolidate_to) - incoming)
        )
        window_start = newest_end - self.settings.recent_window_s
        means = segment_means(self.arena.storage[: self.arena.used], self.segments)
        plan = plan_consolidation(
            self.segments,
            means,
            target_tokens=low_water,
            hard_target_tokens=hard,
            window_start=window_start,
            policy=self.settings.policy,
            merge_target_tokens=self.settings.merge_target_tokens,
            weights=self._weights,
        )
        self._apply(plan.recipes)
        self.consolidations += 1
        self.folded_pairs += plan.folded_pairs
        self.evicted += plan.evicted
        self.window_start = plan.window_start

    def _apply(self, recipes: tuple[Recipe, ...]) -> None:
        self.arena.apply(recipes)
        self.segments = [r.segment for r in recipes]
        self._changed()


def _check_times(start: float, end: float, *, allow_empty: bool = False) -> None:
    if not (math.isfinite(start) and math.isfinite(end)):
        raise MemoryStoreError(f"span [{start}, {end}) is not finite")
    if end < start or (end == start and not allow_empty):
        raise MemoryStoreError(f"span [{start}, {end}) ends before it starts")
