"""Memory work that runs between engine steps in bounded pieces (device thread).

``SnapshotCopy`` copies the segments a stream's snapshot files lack, device -> host, one bounded
chunk at a time, for ``memory.writer.SnapshotWriter`` to write. It watches the arena like a view
does: if rows it has yet to copy are about to be overwritten (a consolidation or a forget between
two chunks) it gives up, and the bank starts a new copy from the new index; records already
written stay useful, since a segment that survives keeps its key.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from memory.segments import Segment
from memory.snapshot import SegmentKey, segment_key
from memory.writer import Commit, RecordChunk


class SnapshotCopy:
    """One stream's snapshot in progress: chunks of new segments, then a commit."""

    def __init__(
        self,
        *,
        stream: str,
        job: int,
        version: int,
        segments: tuple[Segment, ...],
        storage: torch.Tensor,
        sizes: torch.Tensor,
        known: Iterable[SegmentKey],
        chunk_rows: int,
        saved_at: float,
        compact: bool = False,
    ) -> None:
        on_disk = set(known)
        self.stream = stream
        self.job = job
        self.version = version
        self.segments = segments
        self.saved_at = saved_at
        self.compact = compact
        self.aborted = False
        self._storage = storage  # the arena's tensors as of the index (kept if it resizes)
        self._sizes = sizes
        self._pending = [s for s in segments if s.count and segment_key(s) not in on_disk]
        self._next = 0
        self._chunk_rows = max(1, chunk_rows)

    @property
    def rows_left(self) -> int:
        return sum(s.count for s in self._pending[self._next :])

    @property
    def copied_all(self) -> bool:
        return self._next >= len(self._pending)

    def next_chunk(self) -> RecordChunk:
        """Copy the next up to ``chunk_rows`` rows (at least one segment) to the host."""
        picked: list[Segment] = []
        rows = 0
        while self._next < len(self._pending):
            seg = self._pending[self._next]
            if picked and rows + seg.count > self._chunk_rows:
                break
            picked.append(seg)
            rows += seg.count
            self._next += 1
        runs = _runs(picked)
        tokens = torch.cat([self._storage[lo:hi] for lo, hi in runs]).to("cpu")
        sizes = torch.cat([self._sizes[lo:hi] for lo, hi in runs]).to("cpu")
        return RecordChunk(self.stream, self.job, tuple(picked), tokens, sizes)

    def commit(self) -> Commit:
        return Commit(
            self.stream, self.job, self.version, self.segments, self.saved_at, self.compact
        )

    def preserve(self, storage: torch.Tensor, lo: int, hi: int) -> None:
        """Called by the arena before rows ``[lo, hi)`` of ``storage`` change."""
        if storage is not self._storage or self.aborted:
            return
        for seg in self._pending[self._next :]:
            if seg.offset < hi and seg.offset + seg.count > lo:
                self.aborted = True
                return


def _runs(segments: list[Segment]) -> list[tuple[int, int]]:
    """Adjacent segments as one row range each (one copy per run)."""
    runs: list[tuple[int, int]] = []
    for seg in segments:
        if runs and runs[-1][1] == seg.offset:
            runs[-1] = (runs[-1][0], seg.offset + seg.count)
        else:
            runs.append((seg.offset, seg.offset + seg.count))
    return runs
