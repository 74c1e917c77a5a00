"""The memory of every stream under one global budget: the daemon's entry point to ``memory``.

Threading: every mutation runs on one thread (the engine's device thread). A re-entrant lock
guards all state anyway, so ``stats`` may be called from the event loop thread and views may be
read from any thread; the lock is held only for index work and small copies, never for disk I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from memory.capacity import MIB, budget_bytes, bytes_per_token, capacity_hours, stream_shares
from memory.consolidation import ConsolidationPlan
from memory.errors import MemoryStoreError, SnapshotError
from memory.maintenance import SnapshotCopy
from memory.segments import Segment, static_spans
from memory.selection import select_segments
from memory.settings import MemorySettings
from memory.snapshot import (
    LEGACY_SUFFIX,
    REJECTED_DIR,
    SUFFIX,
    TEMP_MARKER,
    claim_fence,
    folder_for,
    move_aside,
    read_stream,
    recorded_fence,
    stream_of,
)
from memory.stream import PlanInputs, StreamMemory, yield_gil
from memory.view import MemoryView
from memory.writer import Commit, RecordChunk, SnapshotHealth, SnapshotWriter

log = logging.getLogger(__name__)

# HiCo keeps 64 tokens per 4-frame clip.
DEFAULT_TOKENS_PER_FRAME = 16.0
# How long a shutdown or a forget waits for the snapshot writer.
FLUSH_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class MemoryStats:
    """An immutable snapshot of one stream's memory, for status views."""

    stream: str
    tokens: int
    budget_tokens: int  # this stream's share
    bytes: int
    budget_bytes: int
    fill: float  # tokens / budget_tokens
    span: tuple[float, float] | None  # (first start, last end), seconds
    levels: dict[int, int]  # level -> token segments
    capacity_hours: float | None  # full-resolution history the share holds at the given fps
    segments: int  # token segments (gaps not counted)
    gaps: int
    gap_seconds: float
    consolidations: int  # passes run
    folded_pairs: int  # pairs merged or thinned, in total
    evicted: int  # token segments dropped because nothing else fitted
    window_s: float | None  # newest seconds protected at the last consolidation (may shrink)
    static_segments: int = 0  # token segments standing for a span without change
    static_seconds: float = 0.0  # seconds of history recorded as unchanged


class MemoryBank:
    """Per-stream token memories sharing one budget, with consolidation, views and snapshots."""

    def __init__(
        self,
        settings: MemorySettings,
        *,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        fingerprint: str,
        tokens_per_frame: float = DEFAULT_TOKENS_PER_FRAME,
    ) -> None:
        self.settings = settings
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.fingerprint = fingerprint
        self.tokens_per_frame = tokens_per_frame
        self.token_bytes = bytes_per_token(hidden_size, torch.empty((), dtype=dtype).element_size())
        self.budget_bytes = budget_bytes(settings.budget_mb)
        self._streams: dict[str, StreamMemory] = {}
        self._retired: set[str] = set()  # streams that get no more clips: share = what they hold
        self._lock = threading.RLock()
        # Snapshots: copies in progress (device thread) feed one writer thread, in order, so
        # an older snapshot of a stream can never land after a newer one.
        self._writer = (
            None
            if self.snapshot_dir is None
            else SnapshotWriter(
                self.snapshot_dir,
                fingerprint=fingerprint,
                dtype=dtype,
                hidden_size=hidden_size,
                compact_ratio=settings.snapshot_compact_ratio,
                max_queued=settings.snapshot_queue_chunks,
            )
        )
        self._copies: deque[SnapshotCopy] = deque()
        self._planner: ThreadPoolExecutor | None = None  # consolidation plans, off the device
        self._plans: dict[str, tuple[PlanInputs, Future[ConsolidationPlan]]] = {}
        self._job_seq = 0
        self._chunk_rows = max(
            1, int(settings.maintenance_chunk_mb * MIB) // (self.token_bytes + 4)
        )
        self._last_snapshot = time.monotonic()

    @property
    def snapshot_dir(self) -> Path | None:
        return None if self.settings.snapshot_dir is None else Path(self.settings.snapshot_dir)

    # ---- streams ------------------------------------------------------------------------

    def add_stream(self, name: str) -> None:
        """Add an empty stream; every stream's share is recomputed (others may consolidate)."""
        with self._lock:
            if name in self._streams:
                raise MemoryStoreError(f"stream {name!r} already exists")
            shares = self._shares([*self._streams, name])
            for stream, share in shares.items():
                self._check_share(stream, share)
            for other, memory in self._streams.items():
                memory.set_capacity(shares[other])
            self._streams[name] = StreamMemory(
                name,
                shares[name],
                self.settings,
                hidden_size=self.hidden_size,
                dtype=self.dtype,
                device=self.device,
            )

    def remove_stream(self, name: str) -> None:
        """Drop a stream's memory (its snapshot file stays); the others' shares grow."""
        with self._lock:
            self._get(name)
            del self._streams[name]
            self._retired.discard(name)
            self._plans.pop(name, None)
            shares = self._shares(list(self._streams))
            for other, memory in self._streams.items():
                memory.set_capacity(shares[other])

    def drop_stream(self, name: str) -> None:
        """Drop a stream whose lease is lost: no snapshot now, and none of the writes still
        queued for it (its new owner's snapshot must stay as that owner wrote it)."""
        self.revoke_snapshots(name)
        self.remove_stream(name)

    def revoke_snapshots(self, name: str) -> None:
        """Refuse every later snapshot write of ``name`` (any thread; the lease is lost)."""
        if self._writer is not None:
            self._writer.revoke(name)

    # ---- fencing (sinks.fleet) ----------------------------------------------------------

    def recorded_fence(self, stream: str) -> int:
        """The highest fence recorded in ``stream``'s snapshot folder (0: none, or no folder)."""
        directory = self.snapshot_dir
        return 0 if directory is None else recorded_fence(folder_for(directory, stream))

    def claim_fence(self, stream: str, fence: int) -> None:
        """Write ``stream``'s snapshots as the holder of ``fence`` from now on (blocking I/O:
        call it off the event loop). Raises ``StaleFence`` when a higher fence owns the folder,
        ``OSError`` when the folder cannot be written."""
        directory = self.snapshot_dir
        if directory is None or self._writer is None:
            return
        claim_fence(folder_for(directory, stream), fence)
        self._writer.set_fence(stream, fence)

    def retire_stream(self, name: str) -> None:
        """A stream that will get no more clips (its source failed for good) keeps the history
        it holds, but its share shrinks to just that; the rest goes to the other streams."""
        with self._lock:
            self._get(name)
            if name in self._retired:
                return
            self._retired.add(name)
            shares = self._shares(list(self._streams))
            for stream, memory in self._streams.items():
                memory.set_capacity(shares[stream])

    def streams(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    # ---- writes (device thread) ---------------------------------------------------------

    def append_clip(
        self, stream: str, tokens: torch.Tensor, start: float, end: float, *, static: bool = False
    ) -> None:
        """Append one clip's tokens [n, H] for ``[start, end)`` seconds; consolidates if full.

        After it returns the stream holds at most its share. Raises ``MemoryStoreError`` for an
        unknown stream, a wrong shape, a clip not newer than the memory or larger than the share.
        ``static``: a keep-alive encode of an unchanged scene (recorded as a static segment).
        """
        with self._lock:
            self._get(stream).append_clip(tokens.detach(), start, end, static=static)

    def extend_static(self, stream: str, start: float, end: float) -> None:
        """Extend the stream's newest segment over ``[start, end)``, a span without change.

        No tokens are added. Raises ``MemoryStoreError`` when the newest segment is a gap, is not
        older than ``end``, or a hole separates it from ``start``.
        """
        with self._lock:
            self._get(stream).extend_static(start, end)

    def add_gap(self, stream: str, start: float, end: float, reason: str) -> None:
        """Record an outage (or any unseen interval) as a gap segment without tokens."""
        with self._lock:
            self._get(stream).add_gap(start, end, reason)

    def forget(self, stream: str, start: float, end: float) -> None:
        """Remove ``[start, end)`` from a stream's memory, recorded as a ``forgotten`` gap.

        Every token segment overlapping the interval is removed whole, its rows zeroed, and when
        snapshots are on the stream's snapshot is rewritten at once, so the interval is gone from
        disk too.
        """
        with self._lock:
            changed = self._get(stream).forget(start, end)
        if changed and self._writer is not None:
            # compacted: the forgotten records leave the data files, not only the manifest
            self.flush_snapshots(stream, compact=True)

    # ---- reads ----------------------------------------------------------------------------

    def view(self, stream: str) -> MemoryView:
        """A consistent view of a stream that later appends and consolidations do not change."""
        with self._lock:
            return self._get(stream).view(self._lock)

    def stats(self, stream: str, fps: float) -> MemoryStats:
        """Status numbers for one stream; ``fps`` is the sampled frame rate (for capacity)."""
        with self._lock:
            memory = self._get(stream)
            segments = memory.segments
            levels = Counter(s.level for s in segments if not s.is_gap)
            gaps = [s for s in segments if s.is_gap]
            tokens, share = memory.tokens, memory.capacity
            span = (segments[0].start, segments[-1].end) if segments else None
            window = None
            if memory.window_start is not None and span is not None:
                window = max(0.0, span[1] - memory.window_start)
            return MemoryStats(
                stream=stream,
                tokens=tokens,
                budget_tokens=share,
                bytes=tokens * self.token_bytes,
                budget_bytes=share * self.token_bytes,
                fill=tokens / share if share else 0.0,
                span=span,
                levels=dict(sorted(levels.items())),
                capacity_hours=capacity_hours(share, fps, self.tokens_per_frame),
                segments=len(segments) - len(gaps),
                gaps=len(gaps),
                gap_seconds=sum((g.duration for g in gaps), 0.0),
                consolidations=memory.consolidations,
                folded_pairs=memory.folded_pairs,
                evicted=memory.evicted,
                window_s=window,
                static_segments=sum(1 for s in segments if s.is_static),
                static_seconds=sum((b - a for a, b in static_spans(segments)), 0.0),
            )

    # ---- maintenance (device thread, between engine steps) -------------------------------

    def maintenance_due(self, now: float | None = None) -> bool:
        """Whether ``run_maintenance`` has work it can do now (cheap; any thread).

        True when a stream passed ``consolidate_at`` (and is not being planned), a plan is
        ready or being written, a snapshot is due, or one is in progress and the writer has
        room for its next chunk. Work that waits on another thread (the planner, a writer
        behind on a slow disk) makes it False, so a caller never spins.
        """
        with self._lock:
            for name, memory in self._streams.items():
                planning = self._plans.get(name)
                if planning is not None:
                    if planning[1].done():
                        return True
                elif memory.committing or memory.consolidation_due():
                    return True
            copying = bool(self._copies) and (self._writer is None or self._writer.has_room())
            return copying or self.snapshot_due(now)

    def run_maintenance(self, budget_s: float) -> None:
        """Do about ``budget_s`` seconds of maintenance, then return (device thread).

        Work comes in pieces of at most ``maintenance_chunk_mb`` (a consolidation step, a
        snapshot chunk) and the budget is checked between pieces, so a call overruns it by at
        most one piece. Consolidation goes first: a stream past ``consolidate_at`` is planned
        on the planner thread (pure, off the device), then the plan is written in steps while
        appends go on. A due snapshot starts here; its chunks go to the writer thread while
        its queue has room. Never raises for I/O (failures are in ``snapshot_health``).
        """
        deadline = time.perf_counter() + budget_s
        with self._lock:
            self._advance_plans()
        while True:  # at least one piece per call, then as many as the budget allows
            with self._lock:
                memory = next((m for m in self._streams.values() if m.committing), None)
                if memory is None:
                    break
                memory.commit_step(self._chunk_rows)
            if time.perf_counter() >= deadline:
                return
        if self.snapshot_due():
            with self._lock:
                self._start_snapshots()
        while self._snapshot_step(wait_s=0.0):
            if time.perf_counter() >= deadline:
                break

    def _advance_plans(self) -> None:
        """Start writing plans that are ready; hand due streams to the planner (lock held)."""
        for name, memory in self._streams.items():
            planning = self._plans.get(name)
            if planning is not None:
                inputs, future = planning
                if not future.done():
                    continue
                del self._plans[name]
                try:
                    plan = future.result()
                except Exception as exc:  # noqa: BLE001 - a planner bug must not stop ingest
                    log.warning("memory: planning %r failed: %s; consolidating inline", name, exc)
                    continue
                memory.start_commit(inputs, plan)  # dropped if the index changed meanwhile
            elif not memory.committing and memory.consolidation_due():
                if self._planner is None:
                    self._planner = ThreadPoolExecutor(1, thread_name_prefix="flashwatch-planner")
                inputs = memory.plan_inputs()
                self._plans[name] = (inputs, self._planner.submit(inputs.plan, yield_gil))

    # ---- snapshots ------------------------------------------------------------------------

    def save_snapshots(self) -> list[str]:
        """Write every changed stream's snapshot now and wait for it; no-op without a folder.

        Never raises for I/O: returns the failure message if this save failed (the failure is
        also counted in ``snapshot_health``; the next save retries). For shutdown and tests.
        """
        return self.flush_snapshots()

    def flush_snapshots(
        self, only: str | None = None, *, compact: bool = False, timeout_s: float = FLUSH_TIMEOUT_S
    ) -> list[str]:
        """Snapshot every changed stream (or ``only``) to completion and wait for the writer."""
        writer = self._writer
        if writer is None:
            return []
        before = writer.health().failures
        with self._lock:
            self._copies.clear()  # a newer copy of each stream replaces one in progress
        if not writer.wait_idle(timeout_s):
            writer.note_failure(only or "*", f"the writer did not finish within {timeout_s:.0f} s")
            return [writer.health().last_error or "snapshot writer timed out"]
        with self._lock:
            self._start_snapshots(only=only, compact=compact)
        while self._snapshot_step(wait_s=timeout_s):
            pass
        if not writer.wait_idle(timeout_s):
            writer.note_failure(only or "*", f"the writer did not finish within {timeout_s:.0f} s")
        health = writer.health()
        return [health.last_error or "snapshot failed"] if health.failures > before else []

    def snapshot_due(self, now: float | None = None) -> bool:
        """Whether ``snapshot_interval_s`` passed since the last snapshot started (monotonic)."""
        now = time.monotonic() if now is None else now
        return (
            self._writer is not None
            and now - self._last_snapshot >= self.settings.snapshot_interval_s
        )

    def snapshot_health(self) -> SnapshotHealth:
        """Last success, failures, last error and bytes written (any thread)."""
        return SnapshotHealth(enabled=False) if self._writer is None else self._writer.health()

    def close(self) -> None:
        """Stop the planner and the snapshot writer (after what it has queued; after the last
        save)."""
        if self._planner is not None:
            self._planner.shutdown(wait=True, cancel_futures=True)
            self._planner = None
        if self._writer is not None:
            self._writer.close()

    def restore_snapshots(self) -> list[str]:
        """Load each configured stream's snapshot if it is sound and fits this model.

        Anything unreadable (a corrupt or mismatched manifest, a bad record, an odd file where a
        snapshot folder should be) is moved into ``rejected/`` with one warning and its stream
        starts empty; a snapshot that cannot even be moved is left in place, also with a
        warning. Snapshots of streams not configured are left where they are. Never raises.
        """
        directory = self.snapshot_dir
        if directory is None:
            return []
        messages: list[str] = []

        def say(level: int, message: str) -> None:
            messages.append(message)
            log.log(level, "%s", message)

        try:
            entries = sorted(directory.iterdir()) if directory.is_dir() else []
        except OSError as exc:
            say(logging.WARNING, f"memory: cannot read {directory}: {exc}; starting empty")
            return messages
        for entry in entries:
            name = entry.name
            try:
                if name == REJECTED_DIR:
                    continue
                if TEMP_MARKER in name and entry.is_file():
                    entry.unlink()
                    say(logging.INFO, f"memory: deleted {name}, an unfinished snapshot write")
                elif name.endswith(LEGACY_SUFFIX):
                    target = move_aside(entry)
                    say(
                        logging.WARNING,
                        f"memory: snapshot rejected, moved to {target}; starting empty: "
                        f"{name} is snapshot format 1, which this build no longer reads",
                    )
                elif name.endswith(SUFFIX):
                    say(*self._restore_one(entry))
            except OSError as exc:
                say(logging.WARNING, f"memory: cannot handle {name} ({exc}); left in place")
        return messages

    def restore_snapshot(self, stream: str) -> str | None:
        """Load one stream's snapshot, if it has one (a stream added while running); say what
        happened, like :meth:`restore_snapshots`."""
        directory = self.snapshot_dir
        if directory is None:
            return None
        folder = folder_for(directory, stream)
        if not folder.exists():
            return None
        level, message = self._restore_one(folder)
        log.log(level, "%s", message)
        return message

    # ---- internals --------------------------------------------------------------------------

    def _get(self, stream: str) -> StreamMemory:
        memory = self._streams.get(stream)
        if memory is None:
            raise MemoryStoreError(f"unknown stream {stream!r}")
        return memory

    def _shares(self, names: list[str]) -> dict[str, int]:
        held = {n: max(1, self._streams[n].tokens) for n in names if n in self._retired}
        spare = self.budget_bytes - sum(held.values()) * self.token_bytes
        growing = [n for n in names if n not in held]
        return {
            **stream_shares(spare, self.token_bytes, growing, self.settings.stream_weights),
            **held,
        }

    def _check_share(self, name: str, share: int) -> None:
        # room for a merged segment and a clip of the same size, at least
        needed = 2 * self.settings.merge_target_tokens
        if share < needed:
            raise MemoryStoreError(
                f"memory budget too small: stream {name!r} would get {share} tokens "
                f"({share * self.token_bytes} bytes), at least {needed} are needed; "
                "raise memory.budget_mb"
            )

    def _start_snapshots(self, only: str | None = None, *, compact: bool = False) -> None:
        """Queue a copy of each stream changed since its last snapshot (lock held)."""
        self._last_snapshot = time.monotonic()
        writer = self._writer
        if writer is None:
            return
        copying = {c.stream for c in self._copies}
        for name, memory in self._streams.items():
            if only is not None and name != only:
                continue
            changed = compact or memory.version != writer.committed_version(name)
            if changed and name not in copying and not writer.busy_with(name):
                self._copies.append(self._copy(name, compact))

    def _copy(self, name: str, compact: bool) -> SnapshotCopy:
        assert self._writer is not None
        memory = self._streams[name]
        self._job_seq += 1
        copy = SnapshotCopy(
            stream=name,
            job=self._job_seq,
            version=memory.version,
            segments=tuple(memory.segments),
            storage=memory.arena.storage,
            sizes=memory.arena.sizes,
            known=self._writer.known(name),
            chunk_rows=self._chunk_rows,
            saved_at=time.time(),
            compact=compact,
        )
        memory.arena.watch(copy)
        return copy

    def _snapshot_step(self, wait_s: float) -> bool:
        """Copy one chunk (or queue one commit); False when there is nothing to do now."""
        writer = self._writer
        if writer is None:
            return False
        with self._lock:
            if not self._copies:
                return False
            copy = self._copies[0]
            if copy.stream not in self._streams:
                self._copies.popleft()
                return True
            if copy.aborted:  # rows it still needed changed: copy from the new index
                self._copies[0] = self._copy(copy.stream, copy.compact)
                return True
            if wait_s <= 0.0 and not writer.has_room():
                return False  # the writer is behind: try again at the next slice
            if copy.copied_all:
                item: RecordChunk | Commit = copy.commit()
                self._copies.popleft()
            else:
                item = copy.next_chunk()
                if not item.segments:
                    return True  # only skipped entries that need no copy
        if not writer.put(item, wait_s):
            writer.note_failure(copy.stream, f"the writer queue stayed full for {wait_s:.0f} s")
            with self._lock:
                self._copies.clear()
            return False
        return True

    def _restore_one(self, folder: Path) -> tuple[int, str]:
        stream = stream_of(folder)
        with self._lock:
            memory = self._streams.get(stream)
        if memory is None:
            return (
                logging.INFO,
                f"memory: {folder.name} is for stream {stream!r}, not configured; left",
            )
        try:
            if not folder.is_dir():
                raise SnapshotError(f"{folder.name}: not a snapshot folder")
            for temp in folder.glob(f"*{TEMP_MARKER}*"):
                temp.unlink()  # an unfinished manifest write: the previous manifest stands
            stored = read_stream(
                folder, fingerprint=self.fingerprint, dtype=self.dtype, hidden_size=self.hidden_size
            )
        except SnapshotError as exc:
            try:
                target = move_aside(folder)
            except OSError as move_exc:
                return logging.WARNING, (
                    f"memory: snapshot rejected and left in place ({move_exc}); "
                    f"starting empty: {exc}"
                )
            return (
                logging.WARNING,
                f"memory: snapshot rejected, moved to {target}; starting empty: {exc}",
            )
        with self._lock:
            memory.load(list(stored.segments), stored.tokens, stored.sizes)
            if self._writer is not None:
                unchanged = memory.tokens == len(stored.tokens)
                self._writer.adopt(stored, memory.version if unchanged else -1)
            span = (
                f"{memory.segments[0].start:.3f}–{memory.segments[-1].end:.3f}"
                if memory.segments
                else "empty"
            )
        return logging.INFO, (
            f"memory: restored {stream!r} from {folder.name}: "
            f"{len(stored.tokens)} tokens, {len(stored.segments)} segments, span {span}"
        )


__all__ = [
    "MemoryBank",
    "MemoryStats",
    "MemoryView",
    "Segment",
    "SnapshotHealth",
    "select_segments",
]
