"""Snapshots of one stream's memory: one safetensors file, the manifest in its metadata.

Layout: ``<snapshot_dir>/<quoted stream name>.fwmem.safetensors`` holding tensors ``tokens``
[N, H] (the memory dtype) and ``sizes`` [N] float32, and under the metadata key
``flashwatch.manifest`` a JSON manifest: format and version, stream, model fingerprint, dtype,
hidden size, the segments, and CRC-32 checksums of both tensors. No pickle anywhere.

Write order (a SIGKILL at any moment leaves the previous snapshot intact): write a temporary file
in the same folder, fsync it, ``os.replace`` it over the snapshot (atomic on POSIX), fsync the
folder. Before the rename the old file is untouched; after it the new one is complete.

Reading checks everything and raises ``SnapshotError``; the bank then moves the file into
``<snapshot_dir>/rejected/`` with a timestamp and starts that stream empty. A snapshot is never
silently loaded or deleted. Leftover temporary files (a crash mid-write) are never valid
snapshots; the bank deletes them and says so.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from memory.segments import Segment, check_index
from model.errors import SnapshotError

FORMAT = "flashwatch-memory"
FORMAT_VERSION = 1
MANIFEST_KEY = "flashwatch.manifest"
SUFFIX = ".fwmem.safetensors"
TEMP_MARKER = ".tmp-"
REJECTED_DIR = "rejected"
SEGMENT_FIELDS = (
    "start", "end", "offset", "count", "level", "kind", "reason", "merges", "clips", "static_from",
)  # fmt: skip

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True, slots=True)
class SnapshotPayload:
    """Everything one snapshot holds, on the CPU."""

    stream: str
    segments: tuple[Segment, ...]
    tokens: torch.Tensor  # [N, H] CPU, the memory dtype
    sizes: torch.Tensor  # [N] CPU float32
    fingerprint: str
    saved_at: float  # UTC epoch seconds
    seq: int = 0  # order of collection within one bank: a later payload is newer


def snapshot_path(directory: Path, stream: str) -> Path:
    """Where ``stream``'s snapshot lives (the name is quoted, so any stream name is safe)."""
    return directory / f"{urllib.parse.quote(stream, safe='')}{SUFFIX}"


def list_snapshots(directory: Path) -> list[Path]:
    """Snapshot files in ``directory`` (not temporaries, not rejected ones), sorted."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if TEMP_MARKER not in p.name)


def list_temporaries(directory: Path) -> list[Path]:
    """Temporary files a crash mid-write left behind."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if TEMP_MARKER in p.name and p.is_file())


def write_snapshot(directory: Path, payload: SnapshotPayload) -> Path:
    """Atomically replace ``payload.stream``'s snapshot; return its path. Raises ``OSError``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = snapshot_path(directory, payload.stream)
    temp = directory / f".{final.name}{TEMP_MARKER}{os.getpid()}-{threading.get_ident()}"
    tokens, sizes = payload.tokens.contiguous(), payload.sizes.contiguous()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "stream": payload.stream,
        "fingerprint": payload.fingerprint,
        "dtype": _dtype_name(tokens.dtype),
        "hidden_size": tokens.shape[1],
        "tokens": tokens.shape[0],
        "tokens_crc32": _crc32(tokens),
        "sizes_crc32": _crc32(sizes),
        "saved_at": payload.saved_at,
        "segment_fields": list(SEGMENT_FIELDS),
        "segments": [[getattr(s, f) for f in SEGMENT_FIELDS] for s in payload.segments],
    }
    try:
        save_file(
            {"tokens": tokens, "sizes": sizes},
            str(temp),
            metadata={MANIFEST_KEY: json.dumps(manifest, separators=(",", ":"))},
        )
        with temp.open("rb") as handle:
            os.fsync(handle.fileno())
        temp.replace(final)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(directory)
    return final


def read_snapshot(
    path: Path, *, fingerprint: str, dtype: torch.dtype, hidden_size: int
) -> SnapshotPayload:
    """Load and fully check one snapshot. Raises ``SnapshotError`` saying what is wrong."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if MANIFEST_KEY not in metadata:
                raise SnapshotError(f"{path.name}: no flashwatch manifest in the metadata")
            manifest = json.loads(metadata[MANIFEST_KEY])
            _check_manifest(path, manifest, fingerprint, dtype, hidden_size)
            tokens = handle.get_tensor("tokens")
            sizes = handle.get_tensor("sizes")
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise SnapshotError(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from exc
    n = manifest["tokens"]
    if tokens.dtype != dtype or tuple(tokens.shape) != (n, hidden_size):
        raise SnapshotError(f"{path.name}: tokens are {tokens.dtype} {list(tokens.shape)}")
    if sizes.dtype != torch.float32 or tuple(sizes.shape) != (n,):
        raise SnapshotError(f"{path.name}: sizes are {sizes.dtype} {list(sizes.shape)}")
    if _crc32(tokens) != manifest["tokens_crc32"] or _crc32(sizes) != manifest["sizes_crc32"]:
        raise SnapshotError(f"{path.name}: checksum mismatch (the file is corrupt)")
    try:
        segments = tuple(_segment(row, manifest["segment_fields"]) for row in manifest["segments"])
        check_index(segments, n)
    except (ValueError, TypeError, KeyError) as exc:
        raise SnapshotError(f"{path.name}: invalid index ({exc})") from exc
    return SnapshotPayload(
        manifest["stream"], segments, tokens, sizes, fingerprint, float(manifest["saved_at"])
    )


def move_aside(path: Path) -> Path:
    """Move a rejected snapshot into ``rejected/`` under a unique, timestamped name."""
    folder = path.parent / REJECTED_DIR
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder / f"{path.name}.{stamp}"
    k = 1
    while target.exists():
        target = folder / f"{path.name}.{stamp}.{k}"
        k += 1
    path.replace(target)
    _fsync_dir(path.parent)
    return target


def _check_manifest(
    path: Path, manifest: Any, fingerprint: str, dtype: torch.dtype, hidden_size: int
) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path.name}: not a flashwatch memory snapshot")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(
            f"{path.name}: format version {manifest.get('format_version')}, "
            f"this build reads {FORMAT_VERSION}"
        )
    if manifest.get("fingerprint") != fingerprint:
        raise SnapshotError(
            f"{path.name}: made by model {manifest.get('fingerprint')!r}, "
            f"the running model is {fingerprint!r}"
        )
    if manifest.get("dtype") != _dtype_name(dtype) or manifest.get("hidden_size") != hidden_size:
        raise SnapshotError(
            f"{path.name}: holds {manifest.get('dtype')} x {manifest.get('hidden_size')}, "
            f"the memory is {_dtype_name(dtype)} x {hidden_size}"
        )
    stream = manifest.get("stream")
    if not isinstance(stream, str) or snapshot_path(path.parent, stream).name != path.name:
        raise SnapshotError(f"{path.name}: names stream {stream!r}, which is another file's")


def _segment(row: list[Any], fields: list[str]) -> Segment:
    values = dict(zip(fields, row, strict=True))
    return Segment(
        start=float(values["start"]),
        end=float(values["end"]),
        offset=int(values["offset"]),
        count=int(values["count"]),
        level=int(values["level"]),
        kind=_kind(values["kind"]),
        reason=None if values["reason"] is None else str(values["reason"]),
        merges=int(values["merges"]),
        clips=int(values["clips"]),
        # absent from snapshots written before static segments existed
        static_from=None if values.get("static_from") is None else float(values["static_from"]),
    )


def _kind(value: object) -> Any:
    if value not in ("clip", "consolidated", "gap", "static"):
        raise ValueError(f"unknown segment kind {value!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise SnapshotError(f"snapshots do not support dtype {dtype}")


def _crc32(tensor: torch.Tensor) -> int:
    data = tensor.detach().contiguous().view(torch.uint8).reshape(-1).cpu().numpy()
    return zlib.crc32(data.data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
