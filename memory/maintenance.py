"""Memory work that runs between engine steps in bounded pieces (device thread).

``SnapshotCopy`` copies the segments a stream's snapshot files lack, device -> host, one bounded
chunk at a time (asynchronously on a GPU: the writer waits for the copy's event), for
``memory.writer.SnapshotWriter`` to write. It watches the arena like a view does: if rows it has
yet to copy are about to be overwritten (a consolidation or a forget between two chunks) it gives
up, and the bank starts a new copy from the new index; records already written stay useful, since a
segment that survives keeps its key.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from memory.segments import Segment
from memory.snapshot import SegmentKey, segment_key
from memory.writer import Commit, RecordChunk

# Index entries one chunk looks at, at most, besides the ones it copies.
SCAN_PER_CHUNK = 2048


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
        known: Collection[SegmentKey],
        chunk_rows: int,
        saved_at: float,
        compact: bool = False,
    ) -> None:
        self.stream = stream
        self.job = job
        self.version = version
        self.segments = segments
        self.saved_at = saved_at
        self.compact = compact
        self.aborted = False
        self._storage = storage  # the arena's tensors as of the index (kept if it resizes)
        self._sizes = sizes
        self._known = known
        self._next = 0  # segments before it are copied or on disk
        self._chunk_rows = max(1, chunk_rows)
        self._skip_to_new()

    @property
    def rows_left(self) -> int:
        return sum(
            s.count for s in self.segments[self._next :] if segment_key(s) not in self._known
        )

    @property
    def copied_all(self) -> bool:
        return self._next >= len(self.segments)

    def next_chunk(self) -> RecordChunk:
        """Copy the next up to ``chunk_rows`` rows (at least one segment) to the host.

        The index is scanned from where the last chunk ended, never whole at once: the work per
        chunk stays bounded however long the index is.
        """
        picked: list[Segment] = []
        rows = scanned = 0
        while self._next < len(self.segments) and scanned < SCAN_PER_CHUNK:
            seg = self.segments[self._next]
            scanned += 1
            if not seg.count or segment_key(seg) in self._known:
                self._next += 1
                continue
            if picked and rows + seg.count > self._chunk_rows:
                break
            picked.append(seg)
            rows += seg.count
            self._next += 1
        self._skip_to_new()
        if not picked:
            return RecordChunk(
                self.stream, self.job, (), self._storage[:0].to("cpu"), self._sizes[:0].to("cpu")
            )
        runs = _runs(picked)
        tokens = torch.cat([self._storage[lo:hi] for lo, hi in runs])
        sizes = torch.cat([self._sizes[lo:hi] for lo, hi in runs])
        if tokens.device.type != "cuda":
            return RecordChunk(
                self.stream, self.job, tuple(picked), tokens.to("cpu"), sizes.to("cpu")
            )
        # GPU only: the copy runs on the device's stream into pinned memory and the writer
        # thread waits for its event, so this thread queues it and goes on to the next step.
        # The gathered rows are new tensors, so a later arena write cannot reach them.
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_sizes = torch.empty(sizes.shape, dtype=sizes.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_sizes.copy_(sizes, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return RecordChunk(self.stream, self.job, tuple(picked), host_tokens, host_sizes, done)

    def commit(self) -> Commit:
        return Commit(
            self.stream, self.job, self.version, self.segments, self.saved_at, self.compact
        )

    def preserve(self, storage: torch.Tensor, lo: int, hi: int) -> None:
        """Called by the arena before rows ``[lo, hi)`` of ``storage`` change.

        Conservative: any change at or after the next row to copy gives up (segments are in
        row order, and a consolidation rewrites everything after its first change anyway).
        """
        if storage is not self._storage or self.aborted or self.copied_all:
            return
        if hi > self.segments[self._next].offset:
            self.aborted = True

    def _skip_to_new(self, limit: int = 0) -> None:
        """Step over a bounded run of segments that need no copy (gaps, records on disk)."""
        scanned = 0
        while self._next < len(self.segments) and scanned < (limit or SCAN_PER_CHUNK):
            seg = self.segments[self._next]
            if seg.count and segment_key(seg) not in self._known:
                return
            self._next += 1
            scanned += 1


def _runs(segments: list[Segment]) -> list[tuple[int, int]]:
    """Adjacent segments as one row range each (one copy per run)."""
    runs: list[tuple[int, int]] = []
    for seg in segments:
        if runs and runs[-1][1] == seg.offset:
            runs[-1] = (runs[-1][0], seg.offset + seg.count)
        else:
            runs.append((seg.offset, seg.offset + seg.count))
    return runs
