"""Evidence frames: a bounded on-disk store of one small JPEG per clip.

    ingest (event loop) ──offer──▶ [bounded queue] ──▶ encoder thread: PIL JPEG, tmp + rename
    answers, alerts ──frames_for──▶ in-memory index of <dir>/<stream>/<start_ms>_<end_ms>.jpg

The folder is the index: file names carry the stream and the clip's span (stream seconds x
1000), so :meth:`FrameStore.open` rebuilds the index after a restart by listing it. Writes are
atomic (a ``.tmp-`` file renamed into place; leftovers are deleted when the folder is read).
Encoding never runs on the event loop nor on the device thread: ``offer`` only enqueues, and
drops (counted) when the encoder thread is behind.

Disk use is bounded twice: ``budget_mb`` over all streams (the stream holding the most bytes
loses its oldest frame first, so a busy stream cannot starve a quiet one) and ``retention_s``
(stream seconds before the stream's newest frame). ``forget`` removes an interval's frames;
``keep_until`` removes frames newer than what the restored memory covers, so after a crash the
frames never cite history the memory no longer has.
"""

from __future__ import annotations

import io
import logging
import queue
import re
import threading
from bisect import bisect_left, insort
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from memory.evidence import EvidenceFrame
from memory.settings import FrameSettings

log = logging.getLogger(__name__)

SUFFIX = ".jpg"
TEMP_MARKER = ".tmp-"
_NAME = re.compile(r"^(-?\d{1,15})_(-?\d{1,15})\.jpg$")
_STREAM = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the config's stream-name pattern
_MIB = 1 << 20


def frame_name(start: float, end: float) -> str:
    """The file name of the frame of a clip spanning ``start..end`` (stream seconds)."""
    return f"{round(start * 1000)}_{round(end * 1000)}{SUFFIX}"


def parse_name(name: str) -> tuple[float, float] | None:
    """``(start, end)`` of a frame file name, or None when it is not one."""
    match = _NAME.match(name)
    if match is None:
        return None
    start, end = int(match[1]) / 1000, int(match[2]) / 1000
    return (start, end) if end >= start else None


def encode_jpeg(rgb: np.ndarray, max_side_px: int, quality: int) -> bytes:
    """JPEG bytes of one ``[H, W, 3]`` uint8 RGB frame, shrunk to ``max_side_px`` at most."""
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if max(image.size) > max_side_px:
        image.thumbnail((max_side_px, max_side_px), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def pick_evenly(count: int, limit: int) -> list[int]:
    """Indices of at most ``limit`` of ``count`` items, spread evenly (first and last kept)."""
    if limit <= 0 or count <= 0:
        return []
    if count <= limit:
        return list(range(count))
    if limit == 1:
        return [count // 2]
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


@dataclass(frozen=True, slots=True, order=True)
class _Entry:
    start: float
    end: float
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class FrameStats:
    """An immutable snapshot of the store, for status."""

    frames: int  # files held
    bytes: int  # their size together
    budget_bytes: int
    written: int  # since start
    dropped: int  # offered while the encoder thread was behind
    failed: int  # encoding or writing failed
    evicted: int  # deleted for the budget or the retention
    queued: int  # waiting for the encoder thread


@dataclass(frozen=True, slots=True)
class _Job:
    stream: str
    start: float
    end: float
    rgb: np.ndarray  # [H, W, 3] uint8, not copied: ingest never writes a frame again


class FrameStore:
    """One folder of evidence frames; thread-safe (the encoder thread writes, others read)."""

    def __init__(self, settings: FrameSettings, directory: Path) -> None:
        self.settings = settings
        self.directory = directory
        self.url_base: str | None = None  # the daemon's HTTP server, once it serves /frames
        self._lock = threading.Lock()
        self._index: dict[str, list[_Entry]] = {}  # per stream, by start
        self._held: dict[str, int] = {}  # bytes per stream
        self._longest: dict[str, float] = {}  # the longest clip per stream, seconds
        self._jobs: queue.Queue[_Job | None] = queue.Queue(settings.queue_frames)
        self._thread: threading.Thread | None = None
        self._written = self._dropped = self._failed = self._evicted = 0

    @property
    def budget_bytes(self) -> int:
        return int(self.settings.budget_mb * _MIB)

    # ---- life cycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Read the folder into the index (deleting unfinished writes); start the encoder thread.

        Raises OSError when the folder cannot be made or read.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        index: dict[str, list[_Entry]] = {}
        for folder in sorted(self.directory.iterdir()):
            if not folder.is_dir() or not _STREAM.match(folder.name):
                continue
            entries = index.setdefault(folder.name, [])
            for path in folder.iterdir():
                if TEMP_MARKER in path.name:
                    path.unlink(missing_ok=True)
                    continue
                span = parse_name(path.name)
                if span is None or not path.is_file():
                    continue
                size = path.stat().st_size
                if size == 0:  # a write the crash cut short before its rename was durable
                    path.unlink(missing_ok=True)
                    continue
                entries.append(_Entry(span[0], span[1], path.name, size))
            entries.sort()
        with self._lock:
            self._index = index
            self._held = {s: sum(e.size for e in entries) for s, entries in index.items()}
            self._longest = {s: max((e.end - e.start for e in entries), default=0.0)
                             for s, entries in index.items()}  # fmt: skip
        self._thread = threading.Thread(target=self._work, name="evidence-frames", daemon=True)
        self._thread.start()
        self._enforce()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the encoder thread."""
        if self._thread is None:
            return
        self._jobs.put(None)  # blocks only while the queue is full: the thread is draining it
        self._thread.join(timeout_s)
        self._thread = None

    # ---- writing ------------------------------------------------------------------------------

    def offer(self, stream: str, start: float, end: float, rgb: np.ndarray) -> bool:
        """Queue one clip's frame (``[H, W, 3]`` uint8, not copied); never blocks.

        Returns False (and counts a drop) when the encoder thread is behind.
        """
        try:
            self._jobs.put_nowait(_Job(stream, start, end, rgb))
        except queue.Full:
            self._dropped += 1
            return False
        return True

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self.write(job.stream, job.start, job.end, job.rgb)
            except (OSError, ValueError, TypeError) as exc:  # disk full, an odd frame
                self._failed += 1
                log.warning("evidence frame of %r at %.3f not kept: %s", job.stream, job.start, exc)

    def write(self, stream: str, start: float, end: float, rgb: np.ndarray) -> EvidenceFrame:
        """Encode and store one frame now, on the calling thread (the encoder thread's step).

        Raises OSError (disk) or ValueError (a bad stream name or frame).
        """
        if not _STREAM.match(stream):
            raise ValueError(f"bad stream name {stream!r}")
        data = encode_jpeg(rgb, self.settings.max_side_px, self.settings.jpeg_quality)
        folder = self.directory / stream
        folder.mkdir(exist_ok=True)
        name = frame_name(start, end)
        temp = folder / f"{TEMP_MARKER}{threading.get_ident()}-{name}"
        temp.write_bytes(data)
        temp.replace(folder / name)
        entry = _Entry(*_span_of(name), name, len(data))
        with self._lock:
            entries = self._index.setdefault(stream, [])
            at = bisect_left(entries, _Entry(entry.start, entry.end, name, -1))
            if at < len(entries) and entries[at].name == name:
                self._held[stream] -= entries.pop(at).size  # the same span again: new picture
            insort(entries, entry)
            self._held[stream] = self._held.get(stream, 0) + entry.size
            self._longest[stream] = max(self._longest.get(stream, 0.0), entry.end - entry.start)
            self._written += 1
        self._enforce()
        return self._frame(stream, entry)

    def _enforce(self) -> None:
        """Delete frames past the retention, then the oldest of the fullest stream's until the
        budget fits (a busy stream cannot push a quiet one's frames out)."""
        doomed: list[tuple[str, _Entry]] = []
        with self._lock:
            for stream, entries in self._index.items():
                if entries:
                    horizon = entries[-1].end - self.settings.retention_s
                    while entries and entries[0].end < horizon:
                        doomed.append((stream, entries.pop(0)))
                        self._held[stream] -= doomed[-1][1].size
            total = sum(self._held.values())
            while total > self.budget_bytes:
                stream = max(self._held, key=self._held.__getitem__)
                entry = self._index[stream].pop(0)
                self._held[stream] -= entry.size
                total -= entry.size
                doomed.append((stream, entry))
            self._evicted += len(doomed)
        self._unlink(doomed)

    def _unlink(self, doomed: list[tuple[str, _Entry]]) -> None:
        for stream, entry in doomed:
            try:
                (self.directory / stream / entry.name).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("evidence frame %s/%s not deleted: %s", stream, entry.name, exc)

    # ---- removing -----------------------------------------------------------------------------

    def forget(self, stream: str, start: float, end: float) -> int:
        """Delete the frames of ``stream`` overlapping ``start..end``; returns how many."""
        with self._lock:
            entries = self._index.get(stream, [])
            gone = [e for e in entries if _overlaps(e, start, end)]
            entries[:] = [e for e in entries if not _overlaps(e, start, end)]
            self._held[stream] = sum(e.size for e in entries)
        self._unlink([(stream, e) for e in gone])
        return len(gone)

    def keep_until(self, stream: str, covered_end: float | None) -> int:
        """Delete the frames of ``stream`` ending after ``covered_end`` (all when None).

        Called once the memory is restored: frames newer than the snapshot (written before a
        crash, after the last snapshot) would cite history the memory no longer holds.
        """
        limit = float("-inf") if covered_end is None else covered_end + 1e-3
        with self._lock:
            entries = self._index.get(stream, [])
            gone = [e for e in entries if e.end > limit]
            entries[:] = [e for e in entries if e.end <= limit]
            self._held[stream] = sum(e.size for e in entries)
        self._unlink([(stream, e) for e in gone])
        return len(gone)

    def reconcile(self, coverage: Mapping[str, tuple[float, float] | None]) -> int:
        """After the memory is restored: per stream, delete frames past what it covers
        (``coverage``: stream -> the restored span, None when it starts empty)."""
        return sum(
            self.keep_until(stream, None if span is None else span[1])
            for stream, span in coverage.items()
        )

    # ---- reading ------------------------------------------------------------------------------

    def frames_for(
        self, stream: str, start: float, end: float, limit: int | None = None
    ) -> list[EvidenceFrame]:
        """The frames of clips overlapping ``start..end``, in time order, at most ``limit``
        (spread evenly over the span)."""
        with self._lock:
            entries = self._index.get(stream, [])
            # clips never overlap much: none starting a longest clip before ``start`` can hit
            first = bisect_left(entries, _Entry(start - self._longest.get(stream, 0.0), -1, "", -1))
            later = bisect_left(entries, _Entry(end, float("inf"), "", 0))  # starts after end
            hits = [e for e in entries[first:later] if _overlaps(e, start, end)]
        if limit is not None:
            hits = [hits[i] for i in pick_evenly(len(hits), limit)]
        return [self._frame(stream, e) for e in hits]

    def frames_for_spans(
        self, spans: list[tuple[str, float, float]], limit: int
    ) -> list[EvidenceFrame]:
        """One frame per cited span (its middle clip's), in the spans' order, at most ``limit``
        spread evenly over them; a frame two spans share is given once."""
        chosen: list[EvidenceFrame] = []
        seen: set[str] = set()
        for stream, start, end in spans:
            frames = self.frames_for(stream, start, end, limit=1)
            if frames and frames[0].path not in seen:
                seen.add(frames[0].path)
                chosen.append(frames[0])
        return [chosen[i] for i in pick_evenly(len(chosen), limit)]

    def path_of(self, stream: str, name: str) -> Path | None:
        """The file of one stored frame, or None: names are checked against the index, so no
        path outside the folder can ever be returned."""
        if not _STREAM.match(stream) or parse_name(name) is None:
            return None
        with self._lock:
            entries = self._index.get(stream, [])
            at = bisect_left(entries, _Entry(*_span_of(name), name, -1))
            known = at < len(entries) and entries[at].name == name
        return self.directory / stream / name if known else None

    def stats(self) -> FrameStats:
        with self._lock:
            frames = sum(len(entries) for entries in self._index.values())
            held = sum(self._held.values())
        return FrameStats(
            frames=frames, bytes=held, budget_bytes=self.budget_bytes, written=self._written,
            dropped=self._dropped, failed=self._failed, evicted=self._evicted,
            queued=self._jobs.qsize(),
        )  # fmt: skip

    def _frame(self, stream: str, entry: _Entry) -> EvidenceFrame:
        url = None if self.url_base is None else f"{self.url_base}/frames/{stream}/{entry.name}"
        path = str((self.directory / stream / entry.name).absolute())
        return EvidenceFrame(stream, entry.start, entry.end, path, url)


def _span_of(name: str) -> tuple[float, float]:
    span = parse_name(name)
    assert span is not None
    return span


def _overlaps(entry: _Entry, start: float, end: float) -> bool:
    """The clip overlaps ``start..end``; an instant (start == end) inside a clip hits it too."""
    if start == end:
        return entry.start <= start <= entry.end
    return entry.start < end and entry.end > start


__all__ = ["EvidenceFrame", "FrameSettings", "FrameStats", "FrameStore"]
