"""A consistent, read-only view of one stream's memory while appends continue.

Choice: copy-on-write of exactly the segments a view can still read. Taking a view copies the
segment tuple (a few words per segment), never tokens; the view reads the live arena tensor.
Appends write rows no current segment uses, so they never disturb a view. Before consolidation,
forgetting or a restore overwrites rows, the arena tells every live view (held weakly), and a view
copies the segments of its own index that lie in those rows. A query that finishes before the next
consolidation therefore copies nothing; one that spans a consolidation pays for its own segments
once. After a share change the arena moves to a new tensor and old views keep reading the old one,
which nothing writes again.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memory.errors import MemoryStoreError
from memory.segments import Segment


@dataclass(frozen=True, eq=False)
class MemoryView:
    """The segments of one stream at one moment and the tokens they index.

    ``segments`` are in time order; ``span`` is ``(first start, last end)`` or ``None`` when the
    stream holds nothing yet.
    """

    stream: str
    segments: tuple[Segment, ...]
    version: int
    _storage: torch.Tensor = field(repr=False)
    _lock: threading.RLock = field(repr=False)
    _private: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def span(self) -> tuple[float, float] | None:
        if not self.segments:
            return None
        return (self.segments[0].start, self.segments[-1].end)

    @property
    def tokens_held(self) -> int:
        return sum(s.count for s in self.segments)

    def gaps(self, start: float | None = None, end: float | None = None) -> list[Segment]:
        """Gap segments overlapping ``[start, end)`` (either side open when ``None``)."""
        return [
            s
            for s in self.segments
            if s.is_gap and (start is None or s.end > start) and (end is None or s.start < end)
        ]

    def tokens(self, segments: Sequence[Segment]) -> torch.Tensor:
        """The tokens of ``segments`` (of this view), concatenated in order: [sum count, H].

        Returns a new tensor (the selection is copied, the history is not), so it stays valid
        whatever the memory does next. Raises ``MemoryStoreError`` for a segment that is not in
        this view (e.g. one taken from an older view).
        """
        pieces: list[torch.Tensor | tuple[int, int]] = []  # private copies or arena row runs
        with self._lock:
            for seg in segments:
                if seg.count == 0:
                    continue
                self._check_member(seg)
                private = self._private.get(seg.offset)
                last = pieces[-1] if pieces else None
                if private is not None:
                    pieces.append(private)
                elif isinstance(last, tuple) and last[1] == seg.offset:
                    pieces[-1] = (last[0], seg.offset + seg.count)  # one copy per adjacent run
                else:
                    pieces.append((seg.offset, seg.offset + seg.count))
            tensors = [
                p if isinstance(p, torch.Tensor) else self._storage[p[0] : p[1]] for p in pieces
            ]
            if not tensors:
                return self._storage.new_empty(0, self._storage.shape[1])
            return torch.cat(tensors)

    def preserve(self, storage: torch.Tensor, lo: int, hi: int) -> None:
        """Called by the arena before rows ``[lo, hi)`` of ``storage`` change."""
        if storage is not self._storage:
            return
        for seg in self.segments:
            overlaps = seg.count and seg.offset < hi and seg.offset + seg.count > lo
            if overlaps and seg.offset not in self._private:
                self._private[seg.offset] = storage[seg.offset : seg.offset + seg.count].clone()

    def _check_member(self, seg: Segment) -> None:
        i = bisect.bisect_left(self.segments, seg.start, key=lambda s: s.start)
        while i < len(self.segments) and self.segments[i].start == seg.start:
            if self.segments[i] == seg:
                return
            i += 1
        raise MemoryStoreError(
            f"segment [{seg.start}, {seg.end}) is not in this view of {self.stream!r}: "
            "read tokens through the view the segments were selected from"
        )
