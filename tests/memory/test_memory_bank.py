"""The bank: appends, gaps, forgetting, views that stay consistent, errors."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from memory.bank import MemoryBank, select_segments
from memory.errors import MemoryStoreError
from memory.segments import GAP_FORGOTTEN, GAP_UNRECORDED, check_index

Clip = Callable[..., torch.Tensor]


def _check(bank: MemoryBank, stream: str = "cam") -> None:
    view = bank.view(stream)
    stats = bank.stats(stream, fps=1.0)
    check_index(view.segments, stats.tokens)
    assert stats.tokens <= stats.budget_tokens


def _fill(bank: MemoryBank, clip: Clip, n: int, t0: float = 0.0, stream: str = "cam") -> None:
    for i in range(n):
        bank.append_clip(stream, clip(float(i)), t0 + 4.0 * i, t0 + 4.0 * i + 4)
        _check(bank, stream)


def test_appends_are_stored_in_place_without_reallocation(
    bank_factory: Callable[..., MemoryBank], clip: Clip
) -> None:
    bank = bank_factory(10)
    storage = bank.view("cam")._storage
    _fill(bank, clip, 5)
    view = bank.view("cam")
    assert view._storage is storage  # the same preallocated tensor
    assert [s.offset for s in view.segments] == [0, 64, 128, 192, 256]
    torch.testing.assert_close(view.tokens(view.segments[2:3]), clip(2.0))


def test_full_stream_consolidates_and_keeps_whole_history(
    bank_factory: Callable[..., MemoryBank], clip: Clip
) -> None:
    bank = bank_factory(10, recent_window_s=12.0)
    _fill(bank, clip, 60)
    stats = bank.stats("cam", fps=1.0)
    assert stats.span == (0.0, 240.0)
    assert stats.consolidations > 0 and stats.evicted == 0
    assert max(stats.levels) > 0
    view = bank.view("cam")
    # the newest window (12 s = 3 clips) is untouched
    assert [s.kind for s in view.segments[-3:]] == ["clip"] * 3
    torch.testing.assert_close(view.tokens(view.segments[-1:]), clip(59.0))


def test_thin_policy_keeps_original_tokens(
    bank_factory: Callable[..., MemoryBank], clip: Clip
) -> None:
    bank = bank_factory(10, policy="thin", recent_window_s=0.0)
    _fill(bank, clip, 30)
    view = bank.view("cam")
    originals = {float(clip(float(i))[0, 0]) for i in range(30)}
    for seg in view.segments:
        first = float(view.tokens([seg])[0, 0])
        assert first in originals  # thinned tokens are some clip's tokens, unmerged


def test_window_shrinks_when_it_alone_exceeds_the_share(
    bank_factory: Callable[..., MemoryBank], clip: Clip
) -> None:
    bank = bank_factory(6, recent_window_s=3600.0)
    _fill(bank, clip, 20)
    stats = bank.stats("cam", fps=1.0)
    assert stats.window_s is not None and stats.window_s < 3600.0
    assert stats.span == (0.0, 80.0) and stats.evicted == 0


def test_holes_become_unrecorded_gaps_and_late_outage_reports_relabel_them(
    bank_factory: Callable[..., MemoryBank], clip: Clip
) -> None:
    bank = bank_factory(10, gap_tolerance_s=1.0)
    bank.append_clip("cam", clip(0.0), 0.0, 4.0)
    bank.append_clip("cam", clip(1.0), 4.5, 8.0)  # jitter: absorbed
    bank.append_clip("cam", clip(2.0), 20.0, 24.0)  # a hole ingest did not report (yet)
    view = bank.view("cam")
    assert view.segments[1].start == 4.0
    assert [(g.start, g.end, g.reason) for g in view.gaps()] == [(8.0, 20.0, GAP_UNRECORDED)]
    bank.add_gap("cam", 10.0, 20.0, "disconnected")
    assert [(g.start, g.end, g.reason) for g in bank.view("cam").gaps()] == [
        (8.0, 10.0, GAP_UNRECORDED),
        (10.0, 20.0, "disconnected"),
    ]
    bank.add_gap("cam", 24.0, 30.0, "stalled")
    bank.add_gap("cam", 30.0, 31.0, "stalled")  # consecutive gaps of one reason coalesce
    assert bank.view("cam").gaps(25.0, None)[0].end == 31.0
    _check(bank)
    stats = bank.stats("cam", fps=1.0)
    assert stats.gaps == 3 and stats.gap_seconds == pytest.approx(19.0)


def test_forget_removes_tokens_and_records_a_gap(
    bank_factory: Callable[..., MemoryBank], clip: Clip
) -> None:
    bank = bank_factory(10)
    _fill(bank, clip, 6)
    bank.forget("cam", 5.0, 11.0)
    view = bank.view("cam")
    _check(bank)
    forgotten = view.gaps()
    assert [(g.start, g.end, g.reason) for g in forgotten] == [(4.0, 12.0, GAP_FORGOTTEN)]
    values = {float(view.tokens([s])[0, 0]) for s in view.segments if not s.is_gap}
    assert values == {float(clip(float(i))[0, 0]) for i in (0, 3, 4, 5)}
    arena = bank._streams["cam"].arena
    assert float(arena.storage[arena.used : 6 * 64].abs().sum()) == 0.0  # rows were zeroed


def test_view_stays_consistent_across_consolidation(
    bank_factory: Callable[..., MemoryBank], clip: Clip
) -> None:
    bank = bank_factory(8, recent_window_s=0.0)
    _fill(bank, clip, 8)
    before = bank.view("cam")
    expected = before.tokens(before.segments)
    _fill(bank, clip, 20, t0=32.0)  # consolidation rewrites the arena in place
    after = bank.view("cam")
    assert after.segments != before.segments
    torch.testing.assert_close(before.tokens(before.segments), expected)
    with pytest.raises(MemoryStoreError, match="not in this view"):
        after.tokens([before.segments[0]])


def test_selected_tokens_are_a_copy(bank_factory: Callable[..., MemoryBank], clip: Clip) -> None:
    bank = bank_factory(4, recent_window_s=0.0)
    _fill(bank, clip, 4)
    view = bank.view("cam")
    chosen = select_segments(view, since=None, until=None, token_budget=128)
    tokens = view.tokens(chosen)
    saved = tokens.clone()
    _fill(bank, clip, 10, t0=16.0)
    torch.testing.assert_close(tokens, saved)


def test_bad_appends_are_refused(bank_factory: Callable[..., MemoryBank], clip: Clip) -> None:
    bank = bank_factory(4)
    bank.append_clip("cam", clip(0.0), 0.0, 4.0)
    with pytest.raises(MemoryStoreError, match="not newer"):
        bank.append_clip("cam", clip(1.0), 0.0, 4.0)
    with pytest.raises(MemoryStoreError, match="expected tokens"):
        bank.append_clip("cam", torch.zeros(64, 3), 4.0, 8.0)
    with pytest.raises(MemoryStoreError, match="exceeds"):
        bank.append_clip("cam", clip(0.0, count=1000), 4.0, 8.0)
    with pytest.raises(MemoryStoreError, match="unknown stream"):
        bank.append_clip("nope", clip(0.0), 4.0, 8.0)
    with pytest.raises(MemoryStoreError, match="ends before"):
        bank.add_gap("cam", 9.0, 8.0, "x")
    with pytest.raises(MemoryStoreError, match="already exists"):
        bank.add_stream("cam")


def test_stats_can_be_read_from_another_thread_while_appending(
    bank_factory: Callable[..., MemoryBank], clip: Clip
) -> None:
    bank = bank_factory(6, recent_window_s=0.0)
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            stats = bank.stats("cam", fps=1.0)
            seen.append(stats.tokens)
            assert stats.tokens <= stats.budget_tokens

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            bank.append_clip("cam", clip(float(i)), 4.0 * i, 4.0 * i + 4)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert seen and max(seen) <= bank.stats("cam", fps=1.0).budget_tokens
