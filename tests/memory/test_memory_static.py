"""Static segments (motion gating): extending the newest segment, snapshots, forget, budget."""

from __future__ import annotations

import json

import pytest
import torch

from memory.errors import MemoryStoreError
from memory.segments import check_index, static_spans
from memory.snapshot import MANIFEST, folder_for


def test_a_static_span_extends_the_newest_segment(bank_factory, clip) -> None:
    bank = bank_factory()
    bank.append_clip("cam", clip(1.0), 0.0, 4.0)
    bank.extend_static("cam", 4.0, 8.0)
    bank.extend_static("cam", 8.0, 12.0)
    view = bank.view("cam")
    (seg,) = view.segments
    assert (seg.start, seg.end, seg.count, seg.kind, seg.static_from) == (
        0.0, 12.0, 64, "static", 4.0,
    )  # fmt: skip
    assert view.tokens_held == 64  # no tokens added
    assert static_spans(view.segments) == [(4.0, 12.0)]
    stats = bank.stats("cam", 1.0)
    assert stats.static_segments == 1 and stats.static_seconds == pytest.approx(8.0)
    # motion again: a new clip follows exactly, and time stays exact
    bank.append_clip("cam", clip(2.0), 12.0, 16.0)
    segments = bank.view("cam").segments
    assert [(s.start, s.end, s.kind) for s in segments] == [
        (0.0, 12.0, "static"),
        (12.0, 16.0, "clip"),
    ]


def test_keepalive_clips_join_one_static_span(bank_factory, clip) -> None:
    bank = bank_factory()
    bank.append_clip("cam", clip(1.0), 0.0, 4.0)  # motion ended in this clip
    bank.extend_static("cam", 4.0, 8.0)
    bank.append_clip("cam", clip(1.1), 8.0, 12.0, static=True)  # keep-alive encode
    bank.extend_static("cam", 12.0, 20.0)
    bank.append_clip("cam", clip(3.0), 20.0, 24.0)  # motion
    segments = bank.view("cam").segments
    assert [s.kind for s in segments] == ["static", "static", "clip"]
    assert static_spans(segments) == [(4.0, 20.0)]
    assert static_spans(segments, 6.0, 10.0) == [(6.0, 10.0)]


def test_a_static_span_is_never_merged_into_a_gap(bank_factory, clip) -> None:
    bank = bank_factory()
    with pytest.raises(MemoryStoreError, match="no segment to extend"):
        bank.extend_static("cam", 0.0, 4.0)  # empty memory
    bank.append_clip("cam", clip(1.0), 0.0, 4.0)
    bank.add_gap("cam", 4.0, 10.0, "disconnected")
    with pytest.raises(MemoryStoreError, match="no segment to extend"):
        bank.extend_static("cam", 10.0, 14.0)
    bank.append_clip("cam", clip(2.0), 10.0, 14.0)
    with pytest.raises(MemoryStoreError, match="does not continue"):
        bank.extend_static("cam", 30.0, 34.0)  # a hole (dropped clips) before it
    with pytest.raises(MemoryStoreError, match="not newer"):
        bank.extend_static("cam", 10.0, 14.0)
    segments = bank.view("cam").segments
    assert [(s.kind, s.start, s.end) for s in segments] == [
        ("clip", 0.0, 4.0),
        ("gap", 4.0, 10.0),
        ("clip", 10.0, 14.0),
    ]


def test_snapshot_and_restore_keep_static_spans(bank_factory, clip, tmp_path) -> None:
    bank = bank_factory(snapshot_dir=str(tmp_path))
    bank.append_clip("cam", clip(1.0), 0.0, 4.0)
    bank.extend_static("cam", 4.0, 40.0)
    bank.append_clip("cam", clip(1.1), 40.0, 44.0, static=True)
    bank.extend_static("cam", 44.0, 60.0)
    bank.append_clip("cam", clip(2.0), 60.0, 64.0)
    assert bank.flush_snapshots() == []
    bank.close()
    manifest = json.loads((folder_for(tmp_path, "cam") / MANIFEST).read_text())
    assert "static_from" in manifest["segment_fields"]
    assert [row[manifest["segment_fields"].index("kind")] for row in manifest["segments"]] == [
        "static", "static", "clip",
    ]  # fmt: skip
    restored = bank_factory(snapshot_dir=str(tmp_path))
    messages = restored.restore_snapshots()
    assert any("restored 'cam'" in m for m in messages), messages
    assert restored.view("cam").segments == bank.view("cam").segments
    assert static_spans(restored.view("cam").segments) == [(4.0, 60.0)]
    assert torch.equal(restored.view("cam").tokens(restored.view("cam").segments[:1]), clip(1.0))
    # memory keeps extending after a restore
    restored.extend_static("cam", 64.0, 70.0)
    assert restored.view("cam").segments[-1].static_from == 64.0


def test_a_snapshot_from_before_static_segments_still_loads(bank_factory, clip, tmp_path) -> None:
    bank = bank_factory(snapshot_dir=str(tmp_path))
    bank.append_clip("cam", clip(1.0), 0.0, 4.0)
    assert bank.flush_snapshots() == []
    bank.close()
    path = folder_for(tmp_path, "cam") / MANIFEST
    manifest = json.loads(path.read_text())  # rewrite it as a build before static spans did
    fields = manifest["segment_fields"]
    drop = fields.index("static_from")
    manifest["segment_fields"] = fields[:drop]
    manifest["segments"] = [row[:drop] for row in manifest["segments"]]
    path.write_text(json.dumps(manifest))
    restored = bank_factory(snapshot_dir=str(tmp_path))
    restored.restore_snapshots()
    assert restored.view("cam").segments == bank.view("cam").segments


def test_forget_removes_a_static_span_whole(bank_factory, clip) -> None:
    bank = bank_factory()
    bank.append_clip("cam", clip(1.0), 0.0, 4.0)
    bank.append_clip("cam", clip(2.0), 4.0, 8.0)
    bank.extend_static("cam", 8.0, 100.0)
    bank.append_clip("cam", clip(3.0), 100.0, 104.0)
    bank.forget("cam", 50.0, 60.0)  # inside the static part: the scene it stands for goes
    segments = bank.view("cam").segments
    assert [(s.kind, s.start, s.end, s.reason) for s in segments] == [
        ("clip", 0.0, 4.0, None),
        ("gap", 4.0, 100.0, "forgotten"),
        ("clip", 100.0, 104.0, None),
    ]
    assert static_spans(segments) == []
    check_index(segments, bank.view("cam").tokens_held)


def test_consolidation_keeps_the_index_valid_with_static_segments(bank_factory, clip) -> None:
    bank = bank_factory(clips=8, recent_window_s=10.0)
    t = 0.0
    for i in range(40):  # alternate motion clips and static stretches, past the budget
        bank.append_clip("cam", clip(float(i)), t, t + 4.0, static=i % 3 == 0)
        t += 4.0
        if i % 2:
            bank.extend_static("cam", t, t + 20.0)
            t += 20.0
    view = bank.view("cam")
    check_index(view.segments, view.tokens_held)
    assert view.span == (0.0, t)  # time stays exact: the history is whole
    stats = bank.stats("cam", 1.0)
    assert stats.consolidations > 0 and view.tokens_held <= stats.budget_tokens
    assert not any(s.is_gap for s in view.segments)  # static spans never became gaps
    assert static_spans(view.segments)[-1][1] == t  # the newest (protected) ones are kept
