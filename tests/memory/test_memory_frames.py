"""Evidence frames: the on-disk store's budget, retention, forget, restart index and consistency."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memory.bank import MemoryBank
from memory.frames import (
    TEMP_MARKER,
    FrameStore,
    encode_jpeg,
    frame_name,
    parse_name,
    pick_evenly,
)
from memory.settings import FrameSettings, MemorySettings

Factory = Callable[..., MemoryBank]
Clip = Callable[..., torch.Tensor]


def _rgb(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def store_at(tmp_path: Path) -> Iterator[Callable[..., FrameStore]]:
    opened: list[FrameStore] = []

    def make(**settings: object) -> FrameStore:
        store = FrameStore(FrameSettings.model_validate(settings), tmp_path / "frames")
        store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_names_carry_the_stream_and_span() -> None:
    assert frame_name(12.5, 14.5) == "12500_14500.jpg"
    assert parse_name("12500_14500.jpg") == (12.5, 14.5)
    assert parse_name(frame_name(1.7e9, 1.7e9 + 2.0)) == (1.7e9, 1.7e9 + 2.0)
    for bad in ("../x.jpg", "1_2.png", "2_1.jpg", "a_b.jpg", ".tmp-1-1_2.jpg", "1_2.jpg/x"):
        assert parse_name(bad) is None


def test_pick_evenly_keeps_the_ends_and_the_bound() -> None:
    assert pick_evenly(3, 8) == [0, 1, 2]
    assert pick_evenly(100, 5) == [0, 25, 50, 74, 99]
    assert pick_evenly(10, 1) == [5] and pick_evenly(10, 0) == [] and pick_evenly(0, 3) == []


def test_a_frame_is_a_small_jpeg_that_decodes(store_at: Callable[..., FrameStore]) -> None:
    store = store_at(max_side_px=32, jpeg_quality=60)
    frame = store.write("cam", 4.0, 6.0, _rgb(1, 112))
    with Image.open(frame.path) as image:
        assert image.format == "JPEG" and max(image.size) == 32
    assert (frame.stream, frame.start, frame.end, frame.url) == ("cam", 4.0, 6.0, None)
    store.url_base = "http://127.0.0.1:9"
    (again,) = store.frames_for("cam", 5.0, 5.0)
    assert again.url == "http://127.0.0.1:9/frames/cam/4000_6000.jpg"


def test_frames_for_covers_a_span_and_is_bounded(store_at: Callable[..., FrameStore]) -> None:
    store = store_at()
    for i in range(20):
        store.write("cam", 2.0 * i, 2.0 * i + 2.0, _rgb(i, 16))
    store.write("other", 0.0, 2.0, _rgb(99, 16))
    hits = store.frames_for("cam", 3.0, 9.0)
    assert [(f.start, f.end) for f in hits] == [(2.0, 4.0), (4.0, 6.0), (6.0, 8.0), (8.0, 10.0)]
    assert [f.start for f in store.frames_for("cam", 0.0, 40.0, limit=3)] == [0.0, 20.0, 38.0]
    assert store.frames_for("cam", 50.0, 60.0) == [] and store.frames_for("nope", 0, 9) == []
    store.write("long", 0.0, 100.0, _rgb(7, 16))  # e.g. a static stretch's clip, or an odd one
    store.write("long", 100.0, 102.0, _rgb(8, 16))
    assert [f.end for f in store.frames_for("long", 50.0, 60.0)] == [100.0]
    spans = [("cam", 0.0, 10.0), ("other", 0.0, 2.0), ("cam", 10.0, 12.0)]
    chosen = store.frames_for_spans(spans, limit=8)
    assert [(f.stream, f.start) for f in chosen] == [("cam", 4.0), ("other", 0.0), ("cam", 10.0)]
    assert len(store.frames_for_spans(spans, limit=2)) == 2


def test_the_disk_budget_is_fair_across_streams(store_at: Callable[..., FrameStore]) -> None:
    size = len(encode_jpeg(_rgb(0, 16), 320, 75))  # every frame here is this one
    store = store_at(budget_mb=10.5 * size / 2**20)  # room for ten frames
    for i in range(30):  # a busy stream first, then a quiet one
        store.write("busy", float(i), i + 1.0, _rgb(0, 16))
    for i in range(3):
        store.write("quiet", float(i), i + 1.0, _rgb(0, 16))
    stats = store.stats()
    assert stats.bytes <= stats.budget_bytes and stats.frames == 10 and stats.evicted == 23
    assert len(store.frames_for("quiet", 0.0, 10.0)) == 3  # the busy stream paid
    assert [f.start for f in store.frames_for("busy", 0.0, 100.0)] == [
        23.0,
        24.0,
        25.0,
        26.0,
        27.0,
        28.0,
        29.0,
    ]
    assert len(list((store.directory / "busy").iterdir())) == 7  # the files went too


def test_retention_drops_frames_older_than_the_newest_by_retention(
    store_at: Callable[..., FrameStore],
) -> None:
    store = store_at(retention_s=60.0)
    for t in (0.0, 30.0, 70.0, 100.0):
        store.write("cam", t, t + 2.0, _rgb(1, 16))
    assert [f.start for f in store.frames_for("cam", 0.0, 200.0)] == [70.0, 100.0]
    assert sorted(p.name for p in (store.directory / "cam").iterdir()) == [
        "100000_102000.jpg", "70000_72000.jpg"]  # fmt: skip


def test_forget_removes_the_interval_only(store_at: Callable[..., FrameStore]) -> None:
    store = store_at()
    for i in range(6):
        store.write("cam", 2.0 * i, 2.0 * i + 2.0, _rgb(i, 16))
    assert store.forget("cam", 3.0, 7.0) == 3  # 2-4, 4-6, 6-8
    assert [f.start for f in store.frames_for("cam", 0.0, 20.0)] == [0.0, 8.0, 10.0]
    assert not (store.directory / "cam" / "4000_6000.jpg").exists()
    assert store.forget("cam", 100.0, 200.0) == 0 and store.forget("nope", 0.0, 1.0) == 0


def test_the_folder_is_the_index_across_a_restart(
    store_at: Callable[..., FrameStore], tmp_path: Path
) -> None:
    store = store_at()
    for i in range(4):
        store.write("cam", 2.0 * i, 2.0 * i + 2.0, _rgb(i, 16))
    store.close()
    folder = tmp_path / "frames" / "cam"
    (folder / f"{TEMP_MARKER}7-8000_10000.jpg").write_bytes(b"half a jpeg")  # a crash mid-write
    (folder / "10000_12000.jpg").write_bytes(b"")  # written, never flushed
    (folder / "notes.txt").write_text("not ours")
    again = store_at()
    assert [f.start for f in again.frames_for("cam", 0.0, 100.0)] == [0.0, 2.0, 4.0, 6.0]
    assert sorted(p.name for p in folder.iterdir()) == [
        "0_2000.jpg", "2000_4000.jpg", "4000_6000.jpg", "6000_8000.jpg", "notes.txt"]  # fmt: skip
    assert again.stats().bytes == sum(
        p.stat().st_size for p in folder.iterdir() if p.suffix == ".jpg")  # fmt: skip


def test_writes_are_atomic_a_reader_never_sees_half_a_file(
    store_at: Callable[..., FrameStore],
) -> None:
    store = store_at()
    target = store.directory / "cam" / frame_name(0.0, 2.0)
    store.write("cam", 0.0, 2.0, _rgb(0, 64))
    stop = threading.Event()
    bad: list[str] = []

    def read() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            try:
                Image.open(io.BytesIO(data)).load()
            except OSError as exc:
                bad.append(str(exc))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(40):  # the same span rewritten (a file replayed): a new picture each time
        store.write("cam", 0.0, 2.0, _rgb(i, 64))
    stop.set()
    reader.join()
    assert bad == [] and store.stats().frames == 1
    assert not [p for p in target.parent.iterdir() if TEMP_MARKER in p.name]


def test_offer_never_blocks_and_counts_drops(tmp_path: Path) -> None:
    store = FrameStore(FrameSettings(queue_frames=2), tmp_path)  # not opened: nobody drains
    results = [store.offer("cam", float(i), i + 1.0, _rgb(i, 16)) for i in range(5)]
    assert results == [True, True, False, False, False] and store.stats().dropped == 3


def test_the_encoder_thread_writes_what_is_offered(store_at: Callable[..., FrameStore]) -> None:
    store = store_at(queue_frames=64)
    for i in range(10):
        assert store.offer("cam", float(i), i + 1.0, _rgb(i, 16))
    store.close()  # drains the queue first
    assert store.stats().written == 10 and len(store.frames_for("cam", 0.0, 10.0)) == 10
    assert store.offer("cam", 20.0, 21.0, np.zeros((4, 4), np.uint8))  # a bad frame: counted
    store.open()
    store.close()
    assert store.stats().failed == 1


def test_after_a_crash_frames_newer_than_the_snapshot_are_removed(
    bank_factory: Factory, clip: Clip, tmp_path: Path, store_at: Callable[..., FrameStore]
) -> None:
    snapshots = tmp_path / "snap"
    bank = bank_factory(40, snapshot_dir=str(snapshots))
    store = store_at()
    for i in range(10):
        if i == 6:
            assert bank.save_snapshots() == []  # the last snapshot before the crash
        bank.append_clip("cam", clip(float(i)), 2.0 * i, 2.0 * i + 2.0)
        store.write("cam", 2.0 * i, 2.0 * i + 2.0, _rgb(i, 16))
    store.write("gone", 0.0, 2.0, _rgb(0, 16))  # a stream whose memory did not survive
    bank.close()  # a crash: no final snapshot
    store.close()

    restored = bank_factory(40, snapshot_dir=str(snapshots), streams=("cam", "gone"))
    restored.restore_snapshots()
    again = store_at()
    removed = again.reconcile({name: restored.view(name).span for name in ("cam", "gone")})
    assert restored.view("cam").span == (0.0, 12.0) and removed == 5
    assert [f.end for f in again.frames_for("cam", 0.0, 100.0)] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert again.frames_for("gone", 0.0, 100.0) == []
    restored.close()


def test_the_frames_folder_defaults_inside_the_snapshot_folder() -> None:
    assert MemorySettings().frames_dir() is None  # no snapshots, no folder: no frames
    assert MemorySettings(snapshot_dir="/var/lib/fw").frames_dir() == "/var/lib/fw/frames"
    off = MemorySettings(snapshot_dir="/s", frames=FrameSettings(enabled=False, dir="/f"))
    assert off.frames_dir() is None
    assert MemorySettings(frames=FrameSettings(dir="/f")).frames_dir() == "/f"
