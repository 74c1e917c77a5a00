"""The memory of every stream under one global budget: the daemon's entry point to ``memory``.

Threading: every mutation runs on one thread (the engine's device thread). A re-entrant lock
guards all state anyway, so ``stats`` may be called from the event loop thread and views may be
read from any thread; the lock is held only for index work and small copies, never for disk I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from memory.capacity import budget_bytes, bytes_per_token, capacity_hours, stream_shares
from memory.segments import Segment, static_spans
from memory.selection import select_segments
from memory.settings import MemorySettings
from memory.snapshot import (
    SnapshotPayload,
    list_snapshots,
    list_temporaries,
    move_aside,
    read_snapshot,
    snapshot_path,
    write_snapshot,
)
from memory.stream import StreamMemory
from memory.view import MemoryView
from model.errors import MemoryStoreError, SnapshotError

log = logging.getLogger(__name__)

# HiCo keeps 64 tokens per 4-frame clip.
DEFAULT_TOKENS_PER_FRAME = 16.0


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
        # Snapshot files are written one at a time, and never older over newer: a periodic
        # write still running at shutdown (or during a forget) must not win over a later one.
        self._write_lock = threading.Lock()
        self._payload_seq = 0
        self._written_seq: dict[str, int] = {}
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
            shares = self._shares(list(self._streams))
            for other, memory in self._streams.items():
                memory.set_capacity(shares[other])

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
            payload = self._payload(stream) if changed and self.snapshot_dir else None
        if payload is not None and self.snapshot_dir is not None:
            self._write(self.snapshot_dir, payload, stream)

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

    # ---- snapshots ------------------------------------------------------------------------

    def save_snapshots(self) -> list[str]:
        """Write every changed stream's snapshot atomically; no-op without ``snapshot_dir``.

        Never raises for I/O: each failure is logged and returned as a message (retry next time).
        Equal to ``write_snapshots(collect_snapshots())``; a daemon that must not block its device
        thread on disk calls ``collect_snapshots`` there and ``write_snapshots`` on a worker.
        """
        return self.write_snapshots(self.collect_snapshots())

    def collect_snapshots(self) -> list[SnapshotPayload]:
        """CPU copies of each stream changed since its last snapshot (call on the device thread)."""
        if self.snapshot_dir is None:
            return []
        self._last_snapshot = time.monotonic()
        payloads = []
        with self._lock:
            for name, memory in self._streams.items():
                if memory.saved_version != memory.version:
                    payloads.append(self._payload(name))
        return payloads

    def write_snapshots(self, payloads: list[SnapshotPayload]) -> list[str]:
        """Write collected payloads atomically (any thread); return failure messages."""
        directory = self.snapshot_dir
        if directory is None:
            return []
        problems = []
        for payload in payloads:
            problem = self._write(directory, payload, payload.stream)
            if problem:
                problems.append(problem)
        return problems

    def snapshot_due(self, now: float | None = None) -> bool:
        """Whether ``snapshot_interval_s`` passed since the last save (monotonic clock)."""
        now = time.monotonic() if now is None else now
        return (
            self.snapshot_dir is not None
            and now - self._last_snapshot >= self.settings.snapshot_interval_s
        )

    def restore_snapshots(self) -> list[str]:
        """Load each configured stream's snapshot if it matches this model; say what happened.

        A corrupt, truncated or mismatched snapshot is moved into ``rejected/`` and its stream
        starts empty. Snapshots of streams not configured are left where they are.
        """
        directory = self.snapshot_dir
        if directory is None:
            return []
        messages = []
        for temp in list_temporaries(directory):
            temp.unlink()
            messages.append(f"memory: deleted {temp.name}, an unfinished snapshot write")
            log.info("%s", messages[-1])
        for path in list_snapshots(directory):
            messages.append(self._restore_one(path))
        return messages

    def restore_snapshot(self, stream: str) -> str | None:
        """Load one stream's snapshot, if it has one (a stream added while running); say what
        happened, like :meth:`restore_snapshots`."""
        directory = self.snapshot_dir
        if directory is None:
            return None
        path = snapshot_path(directory, stream)
        return self._restore_one(path) if path.exists() else None

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

    def _payload(self, name: str) -> SnapshotPayload:
        memory = self._streams[name]
        used = memory.arena.used
        payload = SnapshotPayload(
            stream=name,
            segments=tuple(memory.segments),
            tokens=memory.arena.storage[:used].to("cpu", copy=True),
            sizes=memory.arena.sizes[:used].to("cpu", copy=True),
            fingerprint=self.fingerprint,
            saved_at=time.time(),
            seq=self._next_seq(),
        )
        memory.saved_version = memory.version
        return payload

    def _next_seq(self) -> int:
        self._payload_seq += 1
        return self._payload_seq

    def _write(self, directory: Path, payload: SnapshotPayload, name: str) -> str | None:
        try:
            with self._write_lock:
                if payload.seq <= self._written_seq.get(name, 0):
                    return None  # a newer snapshot of this stream is already on disk
                write_snapshot(directory, payload)
                self._written_seq[name] = payload.seq
        except (OSError, SnapshotError) as exc:
            with self._lock:
                memory = self._streams.get(name)
                if memory is not None:
                    memory.saved_version = -1  # try again next time
            message = f"memory: snapshot of {name!r} failed: {exc}"
            log.warning("%s", message)
            return message
        return None

    def _restore_one(self, path: Path) -> str:
        try:
            payload = read_snapshot(
                path, fingerprint=self.fingerprint, dtype=self.dtype, hidden_size=self.hidden_size
            )
        except SnapshotError as exc:
            target = move_aside(path)
            message = f"memory: snapshot rejected, moved to {target}; starting empty: {exc}"
            log.warning("%s", message)
            return message
        with self._lock:
            memory = self._streams.get(payload.stream)
            if memory is None:
                message = (
                    f"memory: {path.name} is for stream {payload.stream!r}, not configured; left"
                )
                log.info("%s", message)
                return message
            memory.load(list(payload.segments), payload.tokens, payload.sizes)
            memory.saved_version = memory.version if memory.tokens == len(payload.tokens) else -1
            span = (
                f"{memory.segments[0].start:.3f}–{memory.segments[-1].end:.3f}"
                if memory.segments
                else "empty"
            )
        message = (
            f"memory: restored {payload.stream!r} from {path.name}: "
            f"{len(payload.tokens)} tokens, {len(payload.segments)} segments, span {span}"
        )
        log.info("%s", message)
        return message


__all__ = ["MemoryBank", "MemoryStats", "MemoryView", "Segment", "select_segments"]
