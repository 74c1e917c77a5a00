"""Fenced snapshots: two writers of one stream's folder, the one with the older fence refused."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from memory.bank import MemoryBank
from memory.errors import StaleFence
from memory.snapshot import FENCE_FILE, MANIFEST, claim_fence, folder_for, recorded_fence

Clip = Callable[..., torch.Tensor]
Factory = Callable[..., MemoryBank]


def _clips(bank: MemoryBank, clip: Clip, first: int, n: int) -> None:
    for i in range(first, first + n):
        bank.append_clip("cam", clip(float(i)), 4.0 * i, 4.0 * i + 4.0)


def _manifest_fence(tmp_path: Path) -> int:
    fence: int = json.loads((folder_for(tmp_path, "cam") / MANIFEST).read_text())["fence"]
    return fence


def test_the_writer_with_the_older_fence_is_refused(
    bank_factory: Factory, clip: Clip, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = bank_factory(8, snapshot_dir=str(tmp_path))
    old.claim_fence("cam", 1)
    _clips(old, clip, 0, 6)
    assert old.save_snapshots() == []
    assert _manifest_fence(tmp_path) == 1

    new = bank_factory(8, snapshot_dir=str(tmp_path))  # the adopter: restores, then claims
    assert new.recorded_fence("cam") == 1
    assert "restored 'cam'" in new.restore_snapshots()[0]
    new.claim_fence("cam", 2)
    _clips(new, clip, 6, 3)
    assert new.save_snapshots() == []
    manifest = (folder_for(tmp_path, "cam") / MANIFEST).read_bytes()

    _clips(old, clip, 6, 4)  # the paused owner wakes and goes on writing
    with caplog.at_level(logging.WARNING, logger="memory.writer"):
        problems = old.save_snapshots()
    assert problems and "StaleFence" in problems[0] and "fence 2 owns" in problems[0]
    assert (folder_for(tmp_path, "cam") / MANIFEST).read_bytes() == manifest  # untouched
    assert _manifest_fence(tmp_path) == 2
    assert old.snapshot_health().failures == 1

    reread = bank_factory(8, snapshot_dir=str(tmp_path))
    reread.restore_snapshots()
    assert reread.view("cam").tokens_held == new.view("cam").tokens_held
    for bank in (old, new, reread):
        bank.close()


def test_a_claim_never_goes_back_and_a_dropped_stream_writes_nothing(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    folder = folder_for(tmp_path, "cam")
    claim_fence(folder, 5)
    assert recorded_fence(folder) == 5 and (folder / FENCE_FILE).read_text().strip() == "5"
    with pytest.raises(StaleFence):
        claim_fence(folder, 4)
    claim_fence(folder, 5)  # the same owner again (a restart that re-took its lease)

    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    bank.claim_fence("cam", 6)
    _clips(bank, clip, 0, 4)
    bank.drop_stream("cam")  # the lease is lost: nothing more reaches the folder
    bank.add_stream("cam")
    _clips(bank, clip, 0, 4)
    assert bank.save_snapshots() == []  # dropped quietly: the lease loss was the one line
    assert not (folder / MANIFEST).exists()
    bank.close()


def test_an_unfenced_bank_writes_as_before(
    bank_factory: Factory, clip: Clip, tmp_path: Path
) -> None:
    bank = bank_factory(8, snapshot_dir=str(tmp_path))
    _clips(bank, clip, 0, 4)
    assert bank.save_snapshots() == []
    assert _manifest_fence(tmp_path) == 0 and bank.recorded_fence("cam") == 0
    bank.close()
