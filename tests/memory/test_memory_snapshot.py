"""Snapshots: round trip, increments, compaction, rejected files, failures that stay soft."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from memory.bank import MemoryBank
from memory.segments import GAP_FORGOTTEN
from memory.snapshot import MANIFEST, folder_for, read_stream

Clip = Callable[..., torch.Tensor]
Factory = Callable[..., MemoryBank]


def _history(bank: MemoryBank, clip: Clip, n: int = 30, stream: str = "cam") -> None:
    for i in range(n):
        if i == 10:
            bank.add_gap(stream, 40.0, 50.0, "disconnected")
        t0 = 4.0 * i + (10.0 if i >= 10 else 0.0)
        bank.append_clip(stream, clip(float(i)), t0, t0 + 4.0)


def _same_memory(a: MemoryBank, b: MemoryBank, stream: str = "cam") -> None:
    va, vb = a.view(stream), b.view(stream)
    assert va.segments == vb.segments
    assert torch.equal(va.tokens(va.segments), vb.tokens(vb.segments))
    n = va.tokens_held
    assert torch.equal(a._streams[stream].arena.sizes[:n], b._streams[stream].arena.sizes[:n])


def _manifest(tmp_path: Path, stream: str = "cam") -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((folder_for(tmp_path, stream) / MANIFEST).read_text())
    return manifest


def _data_bytes(tmp_path: Path, stream: str = "cam") -> int:
    return sum(p.stat().st_size for p in folder_for(tmp_path, stream).glob("data-*.bin"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_restores_the_same_memory(
    bank_factory: Factory, clip: Clip, tmp_path: Path, dtype: torch.dtype
) -> None:
    bank = bank_factory(8, dtype=dtype, snapshot_dir=str(tmp_path), recent_window_s=20.0)
    _history(bank, clip)
    assert bank.save_snapshots() == []
    restored = bank_factory(8, dtype=dtype, snapshot_dir=str(tmp_path), recent_window_s=20.0)
    messages = restored.restore_snapshots()
    assert len(messages) == 1 and "restored 'cam'" in messages[0]
    _same_memory(bank, restored)  # merge sizes survive too, so later merges stay size-weighted
    assert restored.stats("cam", 1.0).tokens == bank.stats("cam", 1.0).tokens
    health = bank.snapshot_health()
    assert health.enabled and health.failures == 0 and health.last_error is None
    assert health.last_success_at is not None and health.bytes_written > 0
    bank.close()


def test_a_snapshot_writes_only_what_changed(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    bank = bank_factory(40, snapshot_dir=str(tmp_path))
    _history(bank, clip, 20)
    bank.save_snapshots()
    manifest = folder_for(tmp_path, "cam") / MANIFEST
    inode = manifest.stat().st_ino
    first = bank.snapshot_health().last_snapshot_bytes
    assert bank.save_snapshots() == []
    assert manifest.stat().st_ino == inode  # unchanged: not rewritten
    bank.append_clip("cam", clip(99.0), 200.0, 204.0)
    data_before = _data_bytes(tmp_path)
    assert bank.save_snapshots() == []
    assert manifest.stat().st_ino != inode
    record = 64 * (8 * 4 + 4)  # one clip's tokens and sizes
    assert _data_bytes(tmp_path) - data_before == record  # appended, not rewritten
    assert bank.snapshot_health().last_snapshot_bytes < first / 4
    restored = bank_factory(40, snapshot_dir=str(tmp_path))
    restored.restore_snapshots()
    _same_memory(bank, restored)
    plain = bank_factory(8)
    assert plain.save_snapshots() == [] and plain.restore_snapshots() == []
    assert not plain.snapshot_health().enabled


def test_consolidations_are_compacted_and_stay_restorable(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    bank = bank_factory(8, snapshot_dir=str(tmp_path), recent_window_s=8.0)
    for i in range(80):
        bank.append_clip("cam", clip(float(i % 7)), 4.0 * i, 4.0 * i + 4)
        if i % 5 == 0:
            assert bank.save_snapshots() == []
    assert bank.save_snapshots() == []
    assert bank.stats("cam", 1.0).consolidations > 3
    live = bank.stats("cam", 1.0).tokens * (8 * 4 + 4)
    assert _data_bytes(tmp_path) <= 2.0 * live  # the compaction ratio bounds the files
    restored = bank_factory(8, snapshot_dir=str(tmp_path), recent_window_s=8.0)
    assert "restored" in restored.restore_snapshots()[0]
    _same_memory(bank, restored)


def test_maintenance_copies_in_bounded_slices_and_survives_consolidation(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    # chunks of 64 tokens (one clip) at most: every slice copies one clip
    chunk_mb = 64 * (8 * 4 + 4) / 2**20
    bank = bank_factory(
        8, snapshot_dir=str(tmp_path), maintenance_chunk_mb=chunk_mb, recent_window_s=8.0
    )
    _history(bank, clip, 6)
    bank._last_snapshot -= 1e6  # due
    assert bank.maintenance_due()
    bank.run_maintenance(budget_s=0.0)  # starts the snapshot and copies one chunk
    assert len(bank._copies) == 1 and bank._copies[0].rows_left == 5 * 64
    for i in range(6, 14):  # consolidation rewrites rows the copy still needs
        bank.append_clip("cam", clip(float(i)), 4.0 * i + 10, 4.0 * i + 14)
    assert bank._copies[0].aborted
    deadline = time.monotonic() + 30.0
    while bank.maintenance_due() and time.monotonic() < deadline:
        bank.run_maintenance(budget_s=0.0)
        time.sleep(0.001)  # the writer may be behind: the copy waits, never blocks
    assert not bank.maintenance_due()
    assert bank._writer is not None and bank._writer.wait_idle(30.0)
    assert bank.snapshot_health().failures == 0
    restored = bank_factory(8, snapshot_dir=str(tmp_path), recent_window_s=8.0)
    restored.restore_snapshots()
    _same_memory(bank, restored)


def _saved(bank_factory: Factory, clip: Clip, tmp_path: Path, **kw: object) -> Path:
    bank = bank_factory(8, snapshot_dir=str(tmp_path), **kw)
    _history(bank, clip, 12)
    assert bank.save_snapshots() == []
    bank.close()
    return folder_for(tmp_path, "cam")


def _expect_rejected(
    bank: MemoryBank, tmp_path: Path, words: str, caplog: pytest.LogCaptureFixture | None = None
) -> None:
    messages = bank.restore_snapshots()
    assert len(messages) == 1, messages
    assert "rejected" in messages[0] and "starting empty" in messages[0]
    assert words in messages[0], messages[0]
    assert not folder_for(tmp_path, "cam").exists()
    moved = [p for p in (tmp_path / "rejected").iterdir()]
    assert len(moved) == 1  # kept, never deleted
    assert bank.stats("cam", 1.0).tokens == 0 and bank.view("cam").span is None
    if caplog is not None:
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and warnings[0].exc_info is None  # one line, no traceback


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


CORRUPT_MANIFESTS: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "no tokens key": (lambda m: m.pop("tokens"), "tokens"),
    "no records key": (lambda m: m.pop("blocks"), "blocks"),
    "a checksum that is text": (lambda m: m["blocks"][0].__setitem__(2, "x"), "blocks"),
    "saved_at not a number": (lambda m: m.__setitem__("saved_at", "yesterday"), "saved_at"),
    "saved_at infinite": (lambda m: m.__setitem__("saved_at", math.inf), "saved_at"),
    "a count that is text": (lambda m: m["segments"][0].__setitem__(3, "64"), "not an integer"),
    "an unknown segment kind": (lambda m: m["segments"][0].__setitem__(5, "bogus"), "kind"),
    "a record outside the folder": (
        lambda m: m["blocks"][0].__setitem__(0, "../../etc/passwd"),
        "not allowed",
    ),
    "an unknown key": (lambda m: m.__setitem__("extra", 1), "extra"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_MANIFESTS))
def test_each_corrupt_manifest_is_moved_aside_with_one_warning(
    bank_factory: Factory, clip: Clip, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _saved(bank_factory, clip, tmp_path)
    edit, words = CORRUPT_MANIFESTS[case]
    _edit_manifest(folder, edit)
    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="memory"):
        _expect_rejected(bank, tmp_path, words, caplog)
    _history(bank, clip, 3)  # and the stream works, snapshots included
    assert bank.save_snapshots() == []


@pytest.mark.parametrize(
    "damage",
    ["manifest not json", "manifest a list", "manifest missing", "folder is a file"],
)
def test_unreadable_snapshot_folders_are_moved_aside(
    bank_factory: Factory, clip: Clip, tmp_path: Path, damage: str
) -> None:
    folder = _saved(bank_factory, clip, tmp_path)
    manifest = folder / MANIFEST
    if damage == "manifest not json":
        manifest.write_text('{"format": "flashwatch-memory", broken')
    elif damage == "manifest a list":
        manifest.write_text("[1, 2]")
    elif damage == "manifest missing":
        manifest.unlink()
    else:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
        folder.write_bytes(b"not a folder")
    _expect_rejected(bank_factory(8, snapshot_dir=str(tmp_path)), tmp_path, "cam.fwmem")


def test_rejected_existing_as_a_file_does_not_stop_the_start(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    folder = _saved(bank_factory, clip, tmp_path)
    (tmp_path / "rejected").write_text("someone's file")
    _edit_manifest(folder, lambda m: m.pop("tokens"))
    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    messages = bank.restore_snapshots()
    assert "rejected" in messages[0] and "starting empty" in messages[0]
    assert (tmp_path / "rejected").is_dir() and len(list((tmp_path / "rejected").iterdir())) == 1
    kept = list(tmp_path.glob("rejected.not-a-folder.*"))
    assert len(kept) == 1 and kept[0].read_text() == "someone's file"  # never deleted


def test_truncated_data_is_moved_aside(bank_factory: Factory, clip: Clip, tmp_path: Path) -> None:
    folder = _saved(bank_factory, clip, tmp_path)
    (data,) = folder.glob("data-*.bin")
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    _expect_rejected(bank_factory(8, snapshot_dir=str(tmp_path)), tmp_path, "truncated")


def test_flipped_bytes_fail_the_checksum(bank_factory: Factory, clip: Clip, tmp_path: Path) -> None:
    folder = _saved(bank_factory, clip, tmp_path)
    (data,) = folder.glob("data-*.bin")
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF  # inside the token data
    data.write_bytes(bytes(raw))
    _expect_rejected(bank_factory(8, snapshot_dir=str(tmp_path)), tmp_path, "checksum")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_tokens_are_refused_even_with_a_good_checksum(
    bank_factory: Factory, clip: Clip, tmp_path: Path, value: float
) -> None:
    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    bank.append_clip("cam", clip(0.0), 0.0, 4.0)
    bad = clip(1.0)
    bad[3, 2] = value
    bank.append_clip("cam", bad, 4.0, 8.0)
    assert bank.save_snapshots() == []  # written as it is: the check is at the restore
    _expect_rejected(bank_factory(8, snapshot_dir=str(tmp_path)), tmp_path, "not all finite")


def test_other_model_or_dtype_is_moved_aside(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    _saved(bank_factory, clip, tmp_path)
    other = bank_factory(8, snapshot_dir=str(tmp_path), fingerprint="another-model")
    _expect_rejected(other, tmp_path, "made by model 'tiny-test'")
    (tmp_path / "rejected").rename(tmp_path / "old")
    _saved(bank_factory, clip, tmp_path)
    half = bank_factory(8, snapshot_dir=str(tmp_path), dtype=torch.float16)
    _expect_rejected(half, tmp_path, "holds float32 x 8")


def test_format_1_files_are_moved_aside_with_a_message(
    bank_factory: Factory, tmp_path: Path
) -> None:
    (tmp_path / "cam.fwmem.safetensors").write_bytes(b"an old snapshot")
    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    messages = bank.restore_snapshots()
    assert len(messages) == 1 and "format 1" in messages[0] and "starting empty" in messages[0]
    assert len(list((tmp_path / "rejected").iterdir())) == 1


def test_snapshot_of_an_unconfigured_stream_is_left_alone(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    folder = _saved(bank_factory, clip, tmp_path)
    bank = bank_factory(8, streams=("elsewhere",), snapshot_dir=str(tmp_path))
    messages = bank.restore_snapshots()
    assert "not configured" in messages[0] and (folder / MANIFEST).exists()


def test_leftover_temporaries_are_removed(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    folder = _saved(bank_factory, clip, tmp_path)
    (folder / f"{MANIFEST}.tmp-12345-1").write_text("half a manifest")
    (tmp_path / ".cam.fwmem.safetensors.tmp-12345").write_bytes(b"half an old snapshot")
    messages = bank_factory(8, snapshot_dir=str(tmp_path)).restore_snapshots()
    assert any("unfinished snapshot write" in m for m in messages)
    assert any("restored" in m for m in messages)
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_restore_into_a_smaller_share_consolidates(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    _saved(bank_factory, clip, tmp_path, recent_window_s=0.0)
    small = bank_factory(4, snapshot_dir=str(tmp_path), recent_window_s=0.0)
    assert "restored" in small.restore_snapshots()[0]
    stats = small.stats("cam", 1.0)
    assert 0 < stats.tokens <= stats.budget_tokens == 256
    assert stats.span == (0.0, 58.0)
    assert small.save_snapshots() == []  # the smaller memory is written at the next snapshot
    again = bank_factory(4, snapshot_dir=str(tmp_path), recent_window_s=0.0)
    again.restore_snapshots()
    _same_memory(small, again)


def test_forget_rewrites_the_snapshot_at_once_and_leaves_no_bytes_behind(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    _history(bank, clip, 6)
    bank.save_snapshots()
    forgotten = clip(1.0)
    folder = folder_for(tmp_path, "cam")
    needle = forgotten.numpy().tobytes()
    assert any(needle in p.read_bytes() for p in folder.glob("data-*.bin"))
    bank.forget("cam", 4.0, 8.0)
    stored = read_stream(folder, fingerprint="tiny-test", dtype=torch.float32, hidden_size=8)
    assert [(s.start, s.end) for s in stored.segments if s.reason == GAP_FORGOTTEN] == [(4.0, 8.0)]
    assert not any(needle in p.read_bytes() for p in folder.glob("data-*.bin"))


def test_a_full_disk_is_one_warning_a_counter_and_no_exception(
    bank_factory: Factory, clip: Clip, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bank = bank_factory(40, snapshot_dir=str(tmp_path))
    _history(bank, clip, 3)
    assert bank.save_snapshots() == []
    folder = folder_for(tmp_path, "cam")
    for data in [*folder.glob("data-*.bin"), *(folder / f"data-{k:06d}.bin" for k in range(2, 6))]:
        data.unlink(missing_ok=True)
        data.symlink_to("/dev/full")  # every write fails with ENOSPC, from the kernel
    with caplog.at_level(logging.INFO, logger="memory"):
        for i in range(3):  # three intervals on a full disk
            bank.append_clip("cam", clip(50.0 + i), 100.0 + 4 * i, 104.0 + 4 * i)
            problems = bank.save_snapshots()
            assert len(problems) == 1 and "No space left" in problems[0]
    health = bank.snapshot_health()
    assert health.failures == 3 and health.last_error is not None
    assert "No space left on device" in health.last_error and "\n" not in health.last_error
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    assert bank.maintenance_due() is False  # nothing left half done
    bank.close()


def test_serializer_errors_are_counted_like_io_errors(
    bank_factory: Factory, clip: Clip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memory.writer

    def broken(*_: object) -> bytes:
        raise ValueError("the serializer failed")

    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    _history(bank, clip, 3)
    monkeypatch.setattr(memory.writer, "encode_record", broken)
    assert "the serializer failed" in bank.save_snapshots()[0]
    monkeypatch.undo()
    assert bank.save_snapshots() == []  # recovers at the next snapshot
    health = bank.snapshot_health()
    assert health.failures == 1 and health.last_success_at is not None
    restored = bank_factory(8, snapshot_dir=str(tmp_path))
    restored.restore_snapshots()
    _same_memory(bank, restored)


def test_an_unwritable_snapshot_dir_does_not_stop_the_bank(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    target = tmp_path / "file"
    target.write_text("not a folder")
    bank = bank_factory(8, snapshot_dir=str(target))
    assert bank.restore_snapshots() == []
    _history(bank, clip, 2)
    assert len(bank.save_snapshots()) == 1
    assert bank.snapshot_health().failures == 1


_WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from memory.bank import MemoryBank
    from memory.settings import MemorySettings

    bank = MemoryBank(
        MemorySettings(budget_mb=48, snapshot_dir=sys.argv[1]),
        hidden_size=256, dtype=torch.float32, device=torch.device("cpu"), fingerprint="crash",
    )
    bank.add_stream("cam")
    for i in range(8):  # 8 clips of 4096 tokens: a 32 MiB snapshot
        bank.append_clip("cam", torch.full((4096, 256), float(i)), 10.0 * i, 10.0 * i + 10)
    k = 0
    while True:
        bank.add_gap("cam", 80.0 + k, 81.0 + k, f"tick{k}")  # a new version every round
        assert bank.save_snapshots() == []
        print(k, flush=True)
        k += 1
    """
)


@pytest.mark.slow
def test_sigkill_while_writing_leaves_a_loadable_snapshot(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    snapshots = tmp_path / "snapshots"
    rng = random.Random(7)
    for _round in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(snapshots)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # one snapshot is complete
            assert first.strip() == b"0", proc.stderr.read() if proc.stderr else b""
            time.sleep(rng.uniform(0.0, 0.4))  # then die somewhere in a later write
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.stderr is not None:
                proc.stderr.close()
        bank = MemoryBank(
            _settings(snapshots),
            hidden_size=256,
            dtype=torch.float32,
            device=torch.device("cpu"),
            fingerprint="crash",
        )
        bank.add_stream("cam")
        messages = bank.restore_snapshots()
        assert any("restored 'cam'" in m for m in messages), messages
        assert not (snapshots / "rejected").exists(), messages
        view = bank.view("cam")
        clips = [s for s in view.segments if not s.is_gap]
        assert len(clips) == 8
        for i, seg in enumerate(clips):
            assert bool((view.tokens([seg]) == float(i)).all())
        ticks = [s.reason for s in view.gaps()]
        assert ticks == [f"tick{k}" for k in range(len(ticks))] and ticks


def _settings(folder: Path):  # type: ignore[no-untyped-def]
    from memory.settings import MemorySettings

    return MemorySettings(budget_mb=48, snapshot_dir=str(folder))


def test_manifest_is_json_beside_the_records(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    _saved(bank_factory, clip, tmp_path)
    manifest = _manifest(tmp_path)
    assert manifest["format"] == "flashwatch-memory" and manifest["format_version"] == 2
    assert manifest["stream"] == "cam" and manifest["fingerprint"] == "tiny-test"
    assert manifest["dtype"] == "float32" and manifest["hidden_size"] == 8
    assert manifest["tokens"] == sum(row[3] for row in manifest["segments"]) > 0
    assert "disconnected" in [row[6] for row in manifest["segments"]]
    rows = zip(manifest["blocks"], manifest["segments"], strict=True)
    gaps = [block for block, row in rows if row[5] == "gap"]
    assert gaps and all(b is None for b in gaps)


def test_a_flush_wins_over_a_snapshot_in_progress(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    chunk_mb = 64 * (8 * 4 + 4) / 2**20
    bank = bank_factory(8, snapshot_dir=str(tmp_path), maintenance_chunk_mb=chunk_mb)
    _history(bank, clip, 3)
    bank._last_snapshot -= 1e6
    bank.run_maintenance(budget_s=0.0)  # a periodic snapshot is under way
    bank.append_clip("cam", clip(9.0), 100.0, 104.0)
    assert bank.save_snapshots() == []  # shutdown
    restored = bank_factory(8, snapshot_dir=str(tmp_path))
    restored.restore_snapshots()
    _same_memory(bank, restored)
