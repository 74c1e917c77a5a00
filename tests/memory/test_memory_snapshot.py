"""Snapshots: round trip, rejection of bad files (moved aside, empty start), crash safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memory.bank import MemoryBank
from memory.segments import GAP_FORGOTTEN
from memory.snapshot import MANIFEST_KEY, read_snapshot, snapshot_path

Clip = Callable[..., torch.Tensor]
Factory = Callable[..., MemoryBank]


def _history(bank: MemoryBank, clip: Clip, n: int = 30, stream: str = "cam") -> None:
    for i in range(n):
        if i == 10:
            bank.add_gap(stream, 40.0, 50.0, "disconnected")
        t0 = 4.0 * i + (10.0 if i >= 10 else 0.0)
        bank.append_clip(stream, clip(float(i)), t0, t0 + 4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_restores_the_same_memory(
    bank_factory: Factory, clip: Clip, tmp_path: Path, dtype: torch.dtype
) -> None:
    bank = bank_factory(8, dtype=dtype, snapshot_dir=str(tmp_path), recent_window_s=20.0)
    _history(bank, clip)
    assert bank.save_snapshots() == []
    before = bank.view("cam")
    restored = bank_factory(8, dtype=dtype, snapshot_dir=str(tmp_path), recent_window_s=20.0)
    messages = restored.restore_snapshots()
    assert len(messages) == 1 and "restored 'cam'" in messages[0]
    after = restored.view("cam")
    assert after.segments == before.segments
    assert torch.equal(after.tokens(after.segments), before.tokens(before.segments))
    assert restored.stats("cam", 1.0).tokens == bank.stats("cam", 1.0).tokens
    # merge sizes survive too, so later merges stay size-weighted
    assert torch.equal(
        restored._streams["cam"].arena.sizes[: after.tokens_held],
        bank._streams["cam"].arena.sizes[: before.tokens_held],
    )


def test_unchanged_streams_are_not_rewritten_and_no_dir_means_no_files(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    _history(bank, clip, 3)
    bank.save_snapshots()
    path = snapshot_path(tmp_path, "cam")
    inode = path.stat().st_ino
    bank.save_snapshots()
    assert path.stat().st_ino == inode  # not replaced
    bank.append_clip("cam", clip(9.0), 100.0, 104.0)
    bank.save_snapshots()
    assert path.stat().st_ino != inode
    plain = bank_factory(8)
    assert plain.save_snapshots() == [] and plain.restore_snapshots() == []


def _saved(bank_factory: Factory, clip: Clip, tmp_path: Path, **kw: object) -> Path:
    bank = bank_factory(8, snapshot_dir=str(tmp_path), **kw)
    _history(bank, clip, 12)
    bank.save_snapshots()
    return snapshot_path(tmp_path, "cam")


def _expect_rejected(bank: MemoryBank, tmp_path: Path, words: str) -> None:
    messages = bank.restore_snapshots()
    assert len(messages) == 1, messages
    assert "rejected" in messages[0] and "starting empty" in messages[0]
    assert words in messages[0]
    assert not snapshot_path(tmp_path, "cam").exists()
    moved = list((tmp_path / "rejected").iterdir())
    assert len(moved) == 1 and moved[0].stat().st_size > 0  # kept, never deleted
    assert bank.stats("cam", 1.0).tokens == 0 and bank.view("cam").span is None


def test_truncated_snapshot_is_moved_aside(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    path = _saved(bank_factory, clip, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_rejected(bank_factory(8, snapshot_dir=str(tmp_path)), tmp_path, "unreadable")


def test_corrupt_manifest_is_moved_aside(bank_factory: Factory, clip: Clip, tmp_path: Path) -> None:
    path = snapshot_path(tmp_path, "cam")
    save_file(
        {"tokens": torch.zeros(1, 8), "sizes": torch.ones(1)},
        str(path),
        metadata={MANIFEST_KEY: '{"format": "flashwatch-memory", broken'},
    )
    _expect_rejected(bank_factory(8, snapshot_dir=str(tmp_path)), tmp_path, "JSONDecodeError")


def test_flipped_bytes_fail_the_checksum(bank_factory: Factory, clip: Clip, tmp_path: Path) -> None:
    path = _saved(bank_factory, clip, tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the token data
    path.write_bytes(bytes(data))
    _expect_rejected(bank_factory(8, snapshot_dir=str(tmp_path)), tmp_path, "checksum")


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


def test_snapshot_of_an_unconfigured_stream_is_left_alone(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    path = _saved(bank_factory, clip, tmp_path)
    bank = bank_factory(8, streams=("elsewhere",), snapshot_dir=str(tmp_path))
    messages = bank.restore_snapshots()
    assert "not configured" in messages[0] and path.exists()


def test_leftover_temporary_is_removed_with_a_message(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    path = _saved(bank_factory, clip, tmp_path)
    temp = tmp_path / f".{path.name}.tmp-12345"
    temp.write_bytes(b"half a snapshot")
    messages = bank_factory(8, snapshot_dir=str(tmp_path)).restore_snapshots()
    assert any("unfinished snapshot write" in m for m in messages)
    assert any("restored" in m for m in messages)
    assert not temp.exists()


def test_restore_into_a_smaller_share_consolidates(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    _saved(bank_factory, clip, tmp_path, recent_window_s=0.0)
    small = bank_factory(4, snapshot_dir=str(tmp_path), recent_window_s=0.0)
    assert "restored" in small.restore_snapshots()[0]
    stats = small.stats("cam", 1.0)
    assert 0 < stats.tokens <= stats.budget_tokens == 256
    assert stats.span == (0.0, 58.0)


def test_forget_rewrites_the_snapshot_at_once(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    _history(bank, clip, 6)
    bank.save_snapshots()
    bank.forget("cam", 4.0, 8.0)
    payload = read_snapshot(
        snapshot_path(tmp_path, "cam"), fingerprint="tiny-test", dtype=torch.float32, hidden_size=8
    )
    assert [(s.start, s.end) for s in payload.segments if s.reason == GAP_FORGOTTEN] == [(4.0, 8.0)]
    forgotten_value = float(clip(1.0)[0, 0])
    assert not bool((payload.tokens[:, 0] == forgotten_value).any())


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
        assert not (snapshots / "rejected").exists()
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


def test_manifest_is_json_in_safetensors_metadata(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    from safetensors import safe_open

    path = _saved(bank_factory, clip, tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        manifest = json.loads(handle.metadata()[MANIFEST_KEY])
    assert manifest["format"] == "flashwatch-memory" and manifest["format_version"] == 1
    assert manifest["stream"] == "cam" and manifest["fingerprint"] == "tiny-test"
    assert manifest["dtype"] == "float32" and manifest["hidden_size"] == 8
    assert manifest["tokens"] == sum(row[3] for row in manifest["segments"]) > 0
    assert "disconnected" in [row[6] for row in manifest["segments"]]


def test_an_older_payload_never_overwrites_a_newer_snapshot(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    # A periodic write still running when the shutdown (or a forget) writes a newer one.
    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    _history(bank, clip, 3)
    older = bank.collect_snapshots()
    bank.append_clip("cam", clip(9.0), 100.0, 104.0)
    newer = bank.collect_snapshots()
    assert bank.write_snapshots(newer) == []
    assert bank.write_snapshots(older) == []  # skipped: it is older than what is on disk
    restored = bank_factory(8, snapshot_dir=str(tmp_path))
    restored.restore_snapshots()
    assert restored.view("cam").span == bank.view("cam").span
