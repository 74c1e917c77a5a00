"""One stream's tokens in one preallocated device tensor, packed in time order from row 0.

Appending writes the next rows (O(1), no reallocation, no copy of the history). A plan from
``memory.consolidation`` is executed in place, front to back: every new segment lands at or before
the rows it is made from, so nothing is overwritten before it is read. Views taken earlier are
told, just before rows they may read are overwritten, so they can keep a private copy of exactly
those segments (copy-on-write; see ``memory.view``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Protocol

import torch

from memory.consolidation import Recipe
from memory.merge import merge_tokens, merge_tokens_batched

# Overlapping moves go through a bounded temporary of this many rows.
MOVE_CHUNK_ROWS = 4096
# A merged source row costs about this many moved rows (float32 copies, similarity, sort).
MERGE_ROW_COST = 8


class RowWatcher(Protocol):
    """Something that reads arena rows later (a view) and must see them as they are now."""

    def preserve(self, storage: torch.Tensor, lo: int, hi: int) -> None:
        """Rows ``[lo, hi)`` of ``storage`` are about to change: copy what you still need."""


class TokenArena:
    """Rows ``[0, used)`` of ``storage`` [capacity, H] hold tokens; ``sizes`` [capacity] their
    merge sizes (clip tokens each stands for, float32)."""

    def __init__(
        self, capacity: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self.storage = torch.empty(capacity, hidden_size, dtype=dtype, device=device)
        self.sizes = torch.empty(capacity, dtype=torch.float32, device=device)
        self.used = 0
        self._watchers: weakref.WeakSet[RowWatcher] = weakref.WeakSet()

    @property
    def capacity(self) -> int:
        return self.storage.shape[0]

    def watch(self, watcher: RowWatcher) -> None:
        """Tell ``watcher`` before rows it may read are overwritten (held weakly)."""
        self._watchers.add(watcher)

    def append(self, tokens: torch.Tensor, sizes: torch.Tensor | None = None) -> int:
        """Write ``tokens`` [n, H] after the last row; return their first row."""
        n = tokens.shape[0]
        if self.used + n > self.capacity:
            raise ValueError(f"arena full: {self.used} + {n} rows > {self.capacity}")
        offset = self.used
        self.storage[offset : offset + n].copy_(tokens)
        if sizes is None:
            self.sizes[offset : offset + n].fill_(1.0)
        else:
            self.sizes[offset : offset + n].copy_(sizes)
        self.used += n
        return offset

    def rows(self, offset: int, count: int) -> torch.Tensor:
        """Rows ``[offset, offset + count)`` as a view of the storage (not a copy)."""
        return self.storage[offset : offset + count]

    def apply(self, recipes: Sequence[Recipe]) -> None:
        """Rebuild the rows for a new index (consolidation or forgetting), in place."""
        first_changed = next(
            (
                r.segment.offset
                for r in recipes
                if r.combine != "none"
                and not (r.combine == "keep" and r.sources[0].offset == r.segment.offset)
            ),
            None,
        )
        new_used = sum(r.segment.count for r in recipes)
        lo = min(first_changed if first_changed is not None else new_used, new_used)
        if lo >= self.used:
            self.used = new_used
            return
        self._notify(lo, self.used)
        for recipe in recipes:
            seg = recipe.segment
            if recipe.combine == "none" or seg.offset < lo:
                continue
            if recipe.combine in ("keep", "first"):
                self._move(recipe.sources[0].offset, seg.offset, seg.count)
            else:
                first, last = recipe.sources[0], recipe.sources[-1]
                span = slice(first.offset, last.offset + last.count)  # sources are contiguous
                merged, merged_sizes = merge_tokens(self.storage[span], self.sizes[span], seg.count)
                self.storage[seg.offset : seg.offset + seg.count].copy_(merged)
                self.sizes[seg.offset : seg.offset + seg.count].copy_(merged_sizes)
        self.used = new_used

    def clear_free_rows(self, hi: int) -> None:
        """Zero rows ``[used, hi)`` (forgotten tokens must not linger in device memory)."""
        if hi > self.used:
            self._notify(self.used, hi)
            self.storage[self.used : hi].zero_()

    def resize(self, capacity: int) -> None:
        """Move the rows into a new tensor of ``capacity`` rows (a share changed).

        Views keep the old tensor alive and unchanged, so they need no copy.
        """
        if capacity < self.used:
            raise ValueError(f"cannot shrink to {capacity} rows below {self.used} used")
        storage = torch.empty(capacity, self.hidden_size, dtype=self.dtype, device=self.device)
        sizes = torch.empty(capacity, dtype=torch.float32, device=self.device)
        storage[: self.used].copy_(self.storage[: self.used])
        sizes[: self.used].copy_(self.sizes[: self.used])
        self.storage, self.sizes = storage, sizes

    def load(self, tokens: torch.Tensor, sizes: torch.Tensor) -> None:
        """Replace the contents with ``tokens`` [n, H] and ``sizes`` [n] (restore)."""
        self._notify(0, self.used)
        self.used = 0
        self.append(tokens.to(device=self.device, dtype=self.dtype), sizes.to(self.device))

    def _move(self, src: int, dst: int, count: int) -> None:
        """Copy rows ``[src, src + count)`` to ``[dst, ...)`` with ``dst <= src`` (may overlap)."""
        if src == dst or count == 0:
            return
        if dst > src:
            raise ValueError("rows only ever move towards row 0")
        step = min(count, MOVE_CHUNK_ROWS)
        for k in range(0, count, step):
            n = min(step, count - k)
            source = self.storage[src + k : src + k + n]
            if src - dst < n:  # overlapping: copy_ refuses aliasing memory
                source = source.clone()
            self.storage[dst + k : dst + k + n].copy_(source)
            self.sizes[dst + k : dst + k + n].copy_(self.sizes[src + k : src + k + n].clone())

    def _notify(self, lo: int, hi: int) -> None:
        for watcher in list(self._watchers):
            watcher.preserve(self.storage, lo, hi)


class PlanCommit:
    """A consolidation plan written into the arena front to back, a bounded part per ``step``.

    Between steps the arena is consistent for readers and appends: rows before the written part
    hold the new index's segments, rows after it the old ones not yet rewritten (a hole between
    them), and appends go after the old rows (``memory.stream`` moves them down at the end).
    Merges of equal-sized sources run batched (``merge_tokens_batched``). A step does about
    ``max_rows`` rows of work (a merged source row counts ``MERGE_ROW_COST``); views and
    snapshot copies are told before their rows change.
    """

    def __init__(self, arena: TokenArena, recipes: tuple[Recipe, ...]) -> None:
        self.arena = arena
        self.recipes = recipes
        self.next = 0  # recipes [0, next) are written
        self.new_used = sum(r.segment.count for r in recipes)
        self.old_used = arena.used  # the plan's sources are all below this row

    @property
    def done(self) -> bool:
        return self.next >= len(self.recipes)

    def step(self, max_rows: int) -> dict[int, torch.Tensor]:
        """Write the next recipes (at least one); return merged tokens by recipe index."""
        k0 = k = self.next
        rows = 0
        while k < len(self.recipes) and (k == k0 or rows < max_rows):
            recipe = self.recipes[k]
            if recipe.combine == "merge":  # reads, compares and rewrites every source row
                rows += MERGE_ROW_COST * sum(s.count for s in recipe.sources)
            elif _changes(recipe):
                rows += recipe.segment.count
            k += 1
        batch = range(k0, k)
        # Every source lies at or after its own new rows and after every earlier recipe's, so
        # reading all of this step's merge sources first sees them as they were.
        merged = self._merges([i for i in batch if self.recipes[i].combine == "merge"])
        changed = [i for i in batch if _changes(self.recipes[i])]
        if changed:
            first, last = self.recipes[changed[0]].segment, self.recipes[changed[-1]].segment
            self.arena._notify(first.offset, last.offset + last.count)
        run: tuple[int, int, int] | None = None  # (src, dst, rows): adjacent moves as one
        for i in changed:
            recipe = self.recipes[i]
            seg = recipe.segment
            if recipe.combine == "merge":
                if run is not None:
                    self.arena._move(*run)
                    run = None
                tokens, sizes = merged[i]
                self.arena.storage[seg.offset : seg.offset + seg.count].copy_(tokens)
                self.arena.sizes[seg.offset : seg.offset + seg.count].copy_(sizes)
                continue
            src = recipe.sources[0].offset
            if run is not None and run[0] + run[2] == src and run[1] + run[2] == seg.offset:
                run = (run[0], run[1], run[2] + seg.count)
            else:
                if run is not None:
                    self.arena._move(*run)
                run = (src, seg.offset, seg.count)
        if run is not None:
            self.arena._move(*run)
        self.next = k
        return {i: merged[i][0] for i in merged}

    def _merges(self, indices: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        storage, sizes = self.arena.storage, self.arena.sizes
        groups: dict[tuple[int, int], list[int]] = {}
        spans: dict[int, slice] = {}
        for i in indices:
            recipe = self.recipes[i]
            first, last = recipe.sources[0], recipe.sources[-1]
            spans[i] = slice(first.offset, last.offset + last.count)  # sources are contiguous
            n = last.offset + last.count - first.offset
            groups.setdefault((n, recipe.segment.count), []).append(i)
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for (_, target), members in groups.items():
            tokens = torch.stack([storage[spans[i]] for i in members])  # [B, n, H]
            weights = torch.stack([sizes[spans[i]] for i in members])  # [B, n]
            merged, merged_sizes = merge_tokens_batched(tokens, weights, target)
            for j, i in enumerate(members):
                out[i] = (merged[j], merged_sizes[j])
        return out


def _changes(recipe: Recipe) -> bool:
    """Whether a recipe writes rows (a gap does not; a segment kept in place does not)."""
    if recipe.combine == "none":
        return False
    return not (recipe.combine == "keep" and recipe.sources[0].offset == recipe.segment.offset)
