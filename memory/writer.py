"""The snapshot writer: one thread that turns host chunks into files, off the device thread.

The device thread copies a stream's new segments to the host in bounded chunks
(``memory.maintenance.SnapshotCopy``) and hands each chunk here, then a commit naming the whole
index. On a GPU that copy is asynchronous, into pinned memory: a chunk carries the event that marks
its end, and this thread waits for it, so the device thread never waits for the copy. This thread
appends the records, fsyncs, writes the manifest, compacts, and keeps the health numbers. It never
raises: a failure of any kind (``OSError`` such as ENOSPC, or anything else the file layer throws)
is counted, kept as ``last_error``, logged once per failing streak as one warning line, and the
rest of that snapshot is skipped; the next one starts a fresh data file. The queue is bounded:
``offer`` refuses when it is full, so the device thread never waits on disk.

A stream given a fence (``set_fence``: this daemon holds its lease, ``sinks.fleet``) is written
under the folder's ``flock``, and each append or commit is refused (``StaleFence``, counted like
any failure) when the folder records a higher fence; ``revoke`` refuses every later write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from memory.segments import Segment
from memory.snapshot import (
    DATA_NAME,
    MANIFEST,
    Block,
    SegmentKey,
    StoredStream,
    check_fence,
    data_name,
    encode_record,
    folder_for,
    folder_lock,
    manifest_json,
    record_bytes,
    segment_key,
    write_manifest,
)

log = logging.getLogger(__name__)

REVOKED = -1  # the fence of a stream whose lease is lost: every write is refused

# A data file past this size is closed and the next records go to a new one.
MAX_DATA_FILE_BYTES = 1 << 30


class HostCopyDone(Protocol):
    """Marks the end of an asynchronous device -> host copy (a ``torch.cuda.Event``)."""

    def synchronize(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SnapshotHealth:
    """How snapshots are doing, for status. Times are UTC epoch seconds."""

    enabled: bool
    last_success_at: float | None = None  # the last complete snapshot of any stream
    failures: int = 0  # snapshots that failed since start
    last_error: str | None = None  # one line, the latest failure
    bytes_written: int = 0  # data and manifests, since start
    last_snapshot_bytes: int = 0  # written by the latest complete snapshot of one stream
    queued: int = 0  # chunks and commits waiting for the writer


@dataclass(frozen=True, slots=True)
class RecordChunk:
    """New segments' rows of one stream, on the host, in segment order."""

    stream: str
    job: int
    segments: tuple[Segment, ...]
    tokens: torch.Tensor  # [sum count, H] CPU
    sizes: torch.Tensor  # [sum count] CPU float32
    ready: HostCopyDone | None = None  # set while a device -> host copy may still be running


@dataclass(frozen=True, slots=True)
class Commit:
    """The end of one snapshot: the whole index of ``stream`` as of ``version``."""

    stream: str
    job: int
    version: int
    segments: tuple[Segment, ...]
    saved_at: float
    compact: bool = False  # rewrite the live records into a fresh file (after a forget)


@dataclass(slots=True)
class _Files:
    """The writer's picture of one stream's folder (writer thread only, under the lock)."""

    folder: Path
    generation: int = 0
    current: str | None = None  # the file records are appended to
    file_bytes: dict[str, int] = field(default_factory=dict)
    blocks: dict[SegmentKey, Block] = field(default_factory=dict)
    failed_job: int | None = None
    job_bytes: int = 0
    failing: bool = False


class SnapshotWriter:
    """Writes snapshot chunks and commits on its own thread (started on first use)."""

    def __init__(
        self,
        directory: Path,
        *,
        fingerprint: str,
        dtype: torch.dtype,
        hidden_size: int,
        compact_ratio: float,
        max_queued: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self._fingerprint = fingerprint
        self._dtype = dtype
        self._hidden_size = hidden_size
        self._compact_ratio = compact_ratio
        self._clock = clock
        self._queue: queue.Queue[RecordChunk | Commit | None] = queue.Queue(max_queued)
        self._lock = threading.Lock()
        self._files: dict[str, _Files] = {}
        self._committed: dict[str, int] = {}  # stream -> index version on disk
        self._pending_commits: dict[str, int] = {}
        self._fences: dict[str, int] = {}  # stream -> this writer's fence (absent: unfenced)
        self._health = SnapshotHealth(enabled=True)
        self._thread: threading.Thread | None = None

    # ---- device thread ----------------------------------------------------------------------

    def has_room(self) -> bool:
        return not self._queue.full()

    def offer(self, item: RecordChunk | Commit) -> bool:
        """Queue ``item`` without waiting; False when the queue is full (try again later)."""
        self._start()
        if isinstance(item, Commit):
            with self._lock:
                self._pending_commits[item.stream] = self._pending_commits.get(item.stream, 0) + 1
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if isinstance(item, Commit):
                with self._lock:
                    self._pending_commits[item.stream] -= 1
            return False
        return True

    def put(self, item: RecordChunk | Commit, timeout_s: float) -> bool:
        """Queue ``item``, waiting up to ``timeout_s`` for room (shutdown and forget)."""
        deadline = time.monotonic() + timeout_s
        while not self.offer(item):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def known(self, stream: str) -> frozenset[SegmentKey]:
        """Segments whose records are on disk already (need no copy)."""
        with self._lock:
            files = self._files.get(stream)
            return frozenset(files.blocks) if files is not None else frozenset()

    def committed_version(self, stream: str) -> int | None:
        with self._lock:
            return self._committed.get(stream)

    def busy_with(self, stream: str) -> bool:
        """Whether a commit of ``stream`` is still queued or being written."""
        with self._lock:
            return self._pending_commits.get(stream, 0) > 0

    def adopt(self, stored: StoredStream, version: int) -> None:
        """Take over the records of a restored snapshot (they need no rewrite)."""
        with self._lock:
            files = self._files_for(stored.stream)
            files.blocks = dict(stored.blocks)
            files.file_bytes = dict(stored.file_bytes)
            self._committed[stored.stream] = version

    def set_fence(self, stream: str, fence: int) -> None:
        """Write ``stream`` as the holder of ``fence`` from now on (any thread)."""
        with self._lock:
            self._fences[stream] = fence

    def revoke(self, stream: str) -> None:
        """Refuse every later write of ``stream`` (its lease is lost; any thread)."""
        with self._lock:
            self._fences[stream] = REVOKED
            # A later adoption starts from what the folder holds then, not from this picture.
            self._files.pop(stream, None)
            self._committed.pop(stream, None)

    def fence_of(self, stream: str) -> int | None:
        with self._lock:
            return self._fences.get(stream)

    def note_failure(self, stream: str, message: str) -> None:
        """Count a failure found outside this thread (e.g. the writer queue never drained)."""
        with self._lock:
            self._failed(stream, message)

    def health(self) -> SnapshotHealth:
        with self._lock:
            return _replace_queued(self._health, self._queue.qsize())

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until everything queued is written (or failed); False on timeout."""
        done = self._queue.all_tasks_done
        with done:
            return done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        thread.join(timeout_s)
        self._thread = None

    # ---- writer thread ----------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="flashwatch-snapshots", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                # File work runs without the lock: the device thread only ever waits for
                # bookkeeping, never for the disk.
                if isinstance(item, RecordChunk):
                    self._guarded(item, self._append)
                else:
                    self._guarded(item, self._commit)
                    with self._lock:
                        self._pending_commits[item.stream] -= 1
            finally:
                self._queue.task_done()

    def _guarded(self, item: Any, step: Callable[[_Files, Any], None]) -> None:
        with self._lock:
            files = self._files_for(item.stream)
        if files.failed_job == item.job:
            return  # the rest of a failed snapshot: skipped, the next one starts afresh
        with self._lock:
            fence = self._fences.get(item.stream)
        if fence == REVOKED:  # the lease is lost (logged once there): dropped, not a failure
            log.debug("memory: a snapshot write of %r dropped (lease lost)", item.stream)
            return
        try:
            if fence is None:
                step(files, item)
            else:
                with folder_lock(files.folder):
                    check_fence(files.folder, fence)
                    step(files, item)
        except Exception as exc:  # noqa: BLE001 - any file-layer error: counted, never fatal
            with self._lock:
                files.failed_job = item.job
                files.current = None  # never append after a torn record
                files.job_bytes = 0
                self._failed(item.stream, f"{type(exc).__name__}: {exc}")
                files.failing = True

    def _failed(self, stream: str, message: str) -> None:
        """Count one failure (lock held); one warning per failing streak of a stream."""
        line = f"snapshot of {stream!r} failed: " + " ".join(message.split())  # one line
        files = self._files.get(stream)
        if files is None or not files.failing:
            log.warning("memory: %s (counted in status; retried at the next snapshot)", line)
        else:
            log.debug("memory: %s", line)
        h = self._health
        self._health = SnapshotHealth(
            True, h.last_success_at, h.failures + 1, line, h.bytes_written, h.last_snapshot_bytes
        )

    def _append(self, files: _Files, chunk: RecordChunk) -> None:
        if chunk.ready is not None:
            chunk.ready.synchronize()  # the writer thread waits for the copy, not the device
        files.folder.mkdir(parents=True, exist_ok=True)
        name = files.current
        if name is None or files.file_bytes.get(name, 0) >= MAX_DATA_FILE_BYTES:
            name = self._new_file(files)
        new_blocks: dict[SegmentKey, Block] = {}
        row = 0
        with (files.folder / name).open("ab") as handle:
            offset = handle.seek(0, os.SEEK_END)
            for seg in chunk.segments:
                data = encode_record(
                    chunk.tokens[row : row + seg.count], chunk.sizes[row : row + seg.count]
                )
                handle.write(data)
                new_blocks[segment_key(seg)] = Block(name, offset, zlib.crc32(data))
                offset += len(data)
                row += seg.count
            handle.flush()
            os.fsync(handle.fileno())
        written = offset - files.file_bytes.get(name, 0)
        with self._lock:
            files.file_bytes[name] = offset
            files.blocks.update(new_blocks)
            files.job_bytes += written
            self._count_bytes(written)

    def _commit(self, files: _Files, commit: Commit) -> None:
        files.folder.mkdir(parents=True, exist_ok=True)
        blocks: list[Block | None] = []
        for seg in commit.segments:
            block = None if seg.is_gap else files.blocks.get(segment_key(seg))
            if block is None and not seg.is_gap:
                raise RuntimeError(f"no record for the segment at {seg.start} (lost chunk)")
            blocks.append(block)
        live = sum(record_bytes(s.count, self._hidden_size, self._dtype) for s in commit.segments)
        on_disk = sum(files.file_bytes.values())
        if commit.compact or (live and on_disk > self._compact_ratio * live):
            blocks = self._compact(files, commit.segments, blocks)
        text = manifest_json(
            stream=commit.stream,
            fingerprint=self._fingerprint,
            dtype=self._dtype,
            hidden_size=self._hidden_size,
            saved_at=commit.saved_at,
            segments=commit.segments,
            blocks=blocks,
            fence=max(0, self.fence_of(commit.stream) or 0),
        )
        write_manifest(files.folder, text)
        referenced = {b.file for b in blocks if b is not None}
        stale = [n for n in files.file_bytes if n not in referenced and n != files.current]
        with self._lock:
            self._count_bytes(len(text))
            files.blocks = {
                segment_key(s): b for s, b in zip(commit.segments, blocks, strict=True) if b
            }
            for name in stale:
                del files.file_bytes[name]
            self._committed[commit.stream] = commit.version
            if files.failing:
                log.info("memory: snapshots of %r are written again", commit.stream)
                files.failing = False
            h = self._health
            self._health = SnapshotHealth(
                True, self._clock(), h.failures, h.last_error, h.bytes_written,
                files.job_bytes + len(text),
            )  # fmt: skip
            files.job_bytes = 0
        for name in stale:  # after the manifest that no longer names them is durable
            (files.folder / name).unlink(missing_ok=True)

    def _compact(
        self, files: _Files, segments: tuple[Segment, ...], blocks: list[Block | None]
    ) -> list[Block | None]:
        """Copy the live records into a fresh file; the old files go after the manifest."""
        name = self._new_file(files)
        out: list[Block | None] = []
        sources: dict[str, IO[bytes]] = {}
        offset = 0
        try:
            with (files.folder / name).open("wb") as target:
                for seg, block in zip(segments, blocks, strict=True):
                    if block is None:
                        out.append(None)
                        continue
                    source = sources.get(block.file)
                    if source is None:
                        source = sources[block.file] = (files.folder / block.file).open("rb")
                    source.seek(block.offset)
                    data = source.read(record_bytes(seg.count, self._hidden_size, self._dtype))
                    if zlib.crc32(data) != block.crc32:
                        raise OSError(f"{block.file} changed on disk (checksum mismatch)")
                    target.write(data)
                    out.append(Block(name, offset, block.crc32))
                    offset += len(data)
                target.flush()
                os.fsync(target.fileno())
        finally:
            for source in sources.values():
                source.close()
        with self._lock:
            files.file_bytes[name] = offset
            files.job_bytes += offset
            self._count_bytes(offset)
        return out

    def _new_file(self, files: _Files) -> str:
        if files.generation == 0:  # continue after whatever is in the folder
            existing = [
                int(m.group(1))
                for p in files.folder.iterdir()
                if (m := DATA_NAME.fullmatch(p.name)) is not None
            ]
            files.generation = max(existing, default=0)
        files.generation += 1
        files.current = data_name(files.generation)
        files.file_bytes.setdefault(files.current, 0)
        return files.current

    def _files_for(self, stream: str) -> _Files:
        files = self._files.get(stream)
        if files is None:
            files = self._files[stream] = _Files(folder_for(self.directory, stream))
        return files

    def _count_bytes(self, n: int) -> None:
        h = self._health
        self._health = SnapshotHealth(
            True, h.last_success_at, h.failures, h.last_error, h.bytes_written + n,
            h.last_snapshot_bytes,
        )  # fmt: skip


def _replace_queued(health: SnapshotHealth, queued: int) -> SnapshotHealth:
    return SnapshotHealth(
        health.enabled, health.last_success_at, health.failures, health.last_error,
        health.bytes_written, health.last_snapshot_bytes, queued,
    )  # fmt: skip


__all__ = ["MANIFEST", "Commit", "RecordChunk", "SnapshotHealth", "SnapshotWriter"]
