"""Incremental snapshots of one stream's memory: append-only data files plus a JSON manifest.

Layout, one folder per stream::

    <snapshot_dir>/<quoted stream name>.fwmem/
        manifest.json        the index and where each token segment's rows are (atomic replace)
        data-000001.bin      append-only records: a segment's tokens, then its merge sizes
        data-000002.bin      (raw little-endian bytes, no pickle; dtype and width in the manifest)

A token segment's rows never change while it is in the index (consolidation makes new segments,
shifted ones keep their tokens), so a snapshot appends only the segments the files do not hold
yet and rewrites the manifest. Segments are recognised by ``segment_key`` (everything but the
arena offset). Compaction (``memory.writer``) copies the live records into a fresh file and
deletes the older ones when the files hold ``compact_ratio`` times the live bytes, and at once
after a forget, so forgotten tokens leave the disk too.

Write order (a SIGKILL at any moment leaves the previous snapshot intact): append and fsync the
data, then write ``manifest.json`` through a temporary file, fsync, ``os.replace``, fsync the
folder. A manifest only ever names records that were complete on disk before it was written.

Reading checks everything (``read_stream`` raises ``SnapshotError`` saying what is wrong): the
manifest's keys and types (a pydantic model, strict), the model fingerprint, dtype and width,
every record's bounds and CRC-32, finite tokens and positive finite sizes, the index invariants.
The bank then moves the folder into ``<snapshot_dir>/rejected/`` and starts that stream empty.

Fencing (a fleet of daemons sharing the folder, ``sinks.fleet``): the owner of a stream's lease
writes its fence number into ``fence`` when it adopts the stream, and every manifest records the
fence of its writer. Appends and commits run under an exclusive ``flock`` of ``.lock`` and are
refused with ``StaleFence`` when the folder records a higher fence than the writer's, so an owner
paused past its lease can never write over its successor's snapshot.

Format 1 (one ``.fwmem.safetensors`` file per stream, rewritten whole) is no longer read; such a
file is moved to ``rejected/`` with a message saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memory.errors import SnapshotError, StaleFence
from memory.segments import Segment, SegmentKind, check_index

FORMAT: Literal["flashwatch-memory"] = "flashwatch-memory"
FORMAT_VERSION = 2
SUFFIX = ".fwmem"
LEGACY_SUFFIX = ".fwmem.safetensors"  # format 1
MANIFEST = "manifest.json"
TEMP_MARKER = ".tmp-"
REJECTED_DIR = "rejected"
FENCE_FILE = "fence"  # the highest fence that claimed the folder (decimal text)
LOCK_FILE = ".lock"  # flock'ed by every append and commit
DATA_NAME = re.compile(r"data-(\d{6})\.bin")
SEGMENT_FIELDS = (
    "start", "end", "offset", "count", "level", "kind", "reason", "merges", "clips", "static_from",
)  # fmt: skip
SEGMENT_KINDS: frozenset[str] = frozenset(get_args(SegmentKind))  # follows the index's kinds
SIZES_DTYPE = torch.float32

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

SegmentKey = tuple[str, float, float, int, int, int, int]


def segment_key(seg: Segment) -> SegmentKey:
    """What identifies a token segment's rows whatever its arena offset."""
    return (seg.kind, seg.start, seg.end, seg.count, seg.level, seg.merges, seg.clips)


@dataclass(frozen=True, slots=True)
class Block:
    """Where one token segment's record lives: ``file`` at byte ``offset``; CRC-32 of it."""

    file: str
    offset: int
    crc32: int


@dataclass(frozen=True, slots=True)
class StoredStream:
    """A snapshot read back: the index, packed CPU tensors, and the records on disk."""

    stream: str
    segments: tuple[Segment, ...]
    tokens: torch.Tensor  # [N, H] CPU, the memory dtype
    sizes: torch.Tensor  # [N] CPU float32
    saved_at: float  # UTC epoch seconds
    blocks: dict[SegmentKey, Block]
    file_bytes: dict[str, int]  # data file -> bytes on disk


class _Manifest(BaseModel):
    """``manifest.json``; strict, so a missing or mistyped key is a rejection, not a crash."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    format: Literal["flashwatch-memory"]
    format_version: int
    stream: str
    fingerprint: str
    dtype: Literal["float32", "float16", "bfloat16"]
    hidden_size: int = Field(ge=1)
    tokens: int = Field(ge=0)
    saved_at: float = Field(allow_inf_nan=False)
    segment_fields: tuple[str, ...]
    segments: tuple[tuple[Any, ...], ...]
    blocks: tuple[tuple[str, int, int] | None, ...]  # per segment: file, byte offset, CRC-32
    fence: int = Field(0, ge=0)  # the writer's lease fence (0: written outside a fleet)


def folder_for(directory: Path, stream: str) -> Path:
    """Where ``stream``'s snapshot lives (the name is quoted, so any stream name is safe)."""
    return directory / f"{urllib.parse.quote(stream, safe='')}{SUFFIX}"


def stream_of(folder: Path) -> str:
    return urllib.parse.unquote(folder.name.removesuffix(SUFFIX))


def record_bytes(count: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of one segment's record: its tokens, then its float32 sizes."""
    element = torch.empty((), dtype=dtype).element_size()
    return count * (hidden_size * element + SIZES_DTYPE.itemsize)


def encode_record(tokens: torch.Tensor, sizes: torch.Tensor) -> bytes:
    """One record's bytes from CPU ``tokens`` [n, H] and ``sizes`` [n]."""
    return _bytes(tokens) + _bytes(sizes.to(SIZES_DTYPE))


def data_name(generation: int) -> str:
    return f"data-{generation:06d}.bin"


def manifest_json(
    *,
    stream: str,
    fingerprint: str,
    dtype: torch.dtype,
    hidden_size: int,
    saved_at: float,
    segments: tuple[Segment, ...],
    blocks: list[Block | None],
    fence: int = 0,
) -> str:
    manifest = _Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        stream=stream,
        fingerprint=fingerprint,
        dtype=dtype_name(dtype),  # type: ignore[arg-type]
        hidden_size=hidden_size,
        tokens=sum(s.count for s in segments),
        saved_at=saved_at,
        segment_fields=SEGMENT_FIELDS,
        segments=tuple(tuple(getattr(s, f) for f in SEGMENT_FIELDS) for s in segments),
        blocks=tuple(None if b is None else (b.file, b.offset, b.crc32) for b in blocks),
        fence=fence,
    )
    return manifest.model_dump_json()


def write_manifest(folder: Path, text: str) -> None:
    """Atomically replace the folder's manifest. Raises ``OSError``."""
    temp = folder / f"{MANIFEST}{TEMP_MARKER}{os.getpid()}-{threading.get_ident()}"
    try:
        with temp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(folder / MANIFEST)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(folder)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's exclusive ``flock`` (shared storage: NFS locks, or similar). Raises
    ``OSError``."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def recorded_fence(folder: Path) -> int:
    """The highest fence the folder records (its ``fence`` file or its manifest); 0 for none.

    Unreadable or odd content counts as 0: the lease counter in Redis still only grows.
    """
    found = 0
    with contextlib.suppress(OSError, ValueError):
        found = max(found, int((folder / FENCE_FILE).read_text(encoding="ascii").strip()))
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        fence = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("fence", 0)
        if isinstance(fence, int) and not isinstance(fence, bool):
            found = max(found, fence)
    return found


def check_fence(folder: Path, fence: int) -> None:
    """Raise ``StaleFence`` when the folder records a fence above ``fence`` (lock held)."""
    recorded = recorded_fence(folder)
    if fence < 0 or recorded > fence:
        raise StaleFence(
            f"{folder.name}: fence {fence} is stale (fence {recorded} owns the folder now)"
        )


def claim_fence(folder: Path, fence: int) -> None:
    """Record ``fence`` as the folder's owner, under its lock. Raises ``StaleFence`` when a
    higher one is recorded already, ``OSError`` when the folder cannot be written."""
    with folder_lock(folder):
        check_fence(folder, fence)
        temp = folder / f"{FENCE_FILE}{TEMP_MARKER}{os.getpid()}-{threading.get_ident()}"
        try:
            with temp.open("w", encoding="ascii") as handle:
                handle.write(f"{fence}\n")
                handle.flush()
                os.fsync(handle.fileno())
            temp.replace(folder / FENCE_FILE)
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(folder)


def read_stream(
    folder: Path, *, fingerprint: str, dtype: torch.dtype, hidden_size: int
) -> StoredStream:
    """Load and fully check one stream's snapshot. Raises ``SnapshotError`` saying what is wrong."""
    name = folder.name
    try:
        text = (folder / MANIFEST).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{name}: no readable manifest ({type(exc).__name__}: {exc})") from exc
    try:
        manifest = _Manifest.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise SnapshotError(f"{name}: invalid manifest ({where}: {first['msg']})") from exc
    _check_header(name, manifest, fingerprint, dtype, hidden_size, folder)
    try:
        segments = tuple(_segment(row, manifest.segment_fields) for row in manifest.segments)
        check_index(segments, manifest.tokens)
    except (ValueError, TypeError, KeyError) as exc:
        raise SnapshotError(f"{name}: invalid index ({exc})") from exc
    if len(manifest.blocks) != len(segments):
        raise SnapshotError(f"{name}: {len(manifest.blocks)} records for {len(segments)} segments")
    file_bytes: dict[str, int] = {}
    blocks: dict[SegmentKey, Block] = {}
    token_parts: list[torch.Tensor] = []
    size_parts: list[torch.Tensor] = []
    handles: dict[str, Any] = {}
    try:
        for seg, entry in zip(segments, manifest.blocks, strict=True):
            if (entry is None) != seg.is_gap:
                raise SnapshotError(f"{name}: segment at {seg.start} has a wrong record entry")
            if entry is None:
                continue
            block = Block(*entry)
            if DATA_NAME.fullmatch(block.file) is None:
                raise SnapshotError(f"{name}: record file name {block.file!r} is not allowed")
            if block.file not in handles:
                path = folder / block.file
                handles[block.file] = path.open("rb")
                file_bytes[block.file] = path.stat().st_size
            size = record_bytes(seg.count, hidden_size, dtype)
            if block.offset < 0 or block.offset + size > file_bytes[block.file]:
                raise SnapshotError(f"{name}: record of segment at {seg.start} is truncated")
            handle = handles[block.file]
            handle.seek(block.offset)
            data = handle.read(size)
            if zlib.crc32(data) != block.crc32:
                raise SnapshotError(f"{name}: checksum mismatch (the file is corrupt)")
            tokens, sizes = _decode(data, seg.count, hidden_size, dtype)
            token_parts.append(tokens)
            size_parts.append(sizes)
            blocks[segment_key(seg)] = block
    except OSError as exc:
        raise SnapshotError(f"{name}: unreadable ({type(exc).__name__}: {exc})") from exc
    finally:
        for handle in handles.values():
            handle.close()
    tokens = torch.cat(token_parts) if token_parts else torch.empty(0, hidden_size, dtype=dtype)
    sizes = torch.cat(size_parts) if size_parts else torch.empty(0, dtype=SIZES_DTYPE)
    if not bool(torch.isfinite(tokens.to(torch.float32)).all()):
        raise SnapshotError(f"{name}: tokens are not all finite (NaN or infinity)")
    if not bool((torch.isfinite(sizes) & (sizes > 0)).all()):
        raise SnapshotError(f"{name}: merge sizes are not all positive and finite")
    return StoredStream(
        manifest.stream, segments, tokens, sizes, manifest.saved_at, blocks, file_bytes
    )


def move_aside(path: Path) -> Path:
    """Move a rejected snapshot (file or folder) into ``rejected/`` under a unique name.

    A ``rejected`` that is not a folder is itself moved out of the way first. Raises ``OSError``.
    """
    folder = path.parent / REJECTED_DIR
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if folder.exists() and not folder.is_dir():
        folder.replace(_unique(path.parent / f"{REJECTED_DIR}.not-a-folder.{stamp}"))
    folder.mkdir(exist_ok=True)
    target = _unique(folder / f"{path.name}.{stamp}")
    path.replace(target)
    fsync_dir(path.parent)
    return target


def dtype_name(dtype: torch.dtype) -> str:
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise SnapshotError(f"snapshots do not support dtype {dtype}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- internals --------------------------------------------------------------------------------


def _check_header(
    name: str,
    manifest: _Manifest,
    fingerprint: str,
    dtype: torch.dtype,
    hidden_size: int,
    folder: Path,
) -> None:
    if manifest.format_version != FORMAT_VERSION:
        raise SnapshotError(
            f"{name}: format version {manifest.format_version}, this build reads {FORMAT_VERSION}"
        )
    if manifest.fingerprint != fingerprint:
        raise SnapshotError(
            f"{name}: made by model {manifest.fingerprint!r}, the running model is {fingerprint!r}"
        )
    if manifest.dtype != dtype_name(dtype) or manifest.hidden_size != hidden_size:
        raise SnapshotError(
            f"{name}: holds {manifest.dtype} x {manifest.hidden_size}, "
            f"the memory is {dtype_name(dtype)} x {hidden_size}"
        )
    if folder_for(folder.parent, manifest.stream).name != folder.name:
        raise SnapshotError(f"{name}: names stream {manifest.stream!r}, which is another folder's")


def _segment(row: tuple[Any, ...], fields: tuple[str, ...]) -> Segment:
    values = dict(zip(fields, row, strict=True))
    kind = values["kind"]
    if kind not in SEGMENT_KINDS:
        raise ValueError(f"unknown segment kind {kind!r}")
    start, end = _number(values["start"]), _number(values["end"])
    return Segment(
        start=start,
        end=end,
        offset=_integer(values["offset"]),
        count=_integer(values["count"]),
        level=_integer(values["level"]),
        kind=kind,
        reason=None if values["reason"] is None else str(values["reason"]),
        merges=_integer(values["merges"]),
        clips=_integer(values["clips"]),
        # absent from snapshots written before static segments existed
        static_from=None if values.get("static_from") is None else _number(values["static_from"]),
    )


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()


def _decode(
    data: bytes, count: int, hidden_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    split = count * hidden_size * torch.empty((), dtype=dtype).element_size()
    tokens = raw[:split].view(dtype).reshape(count, hidden_size)
    sizes = raw[split:].view(SIZES_DTYPE)
    return tokens, sizes


def _unique(target: Path) -> Path:
    candidate, k = target, 1
    while candidate.exists() or candidate.is_symlink():
        candidate = target.with_name(f"{target.name}.{k}")
        k += 1
    return candidate
