"""Selecting segments for a query: uniform over the range, under the token budget."""

from __future__ import annotations

from memory.segments import Segment, gap
from memory.selection import select_segments


def _clips(n: int, count: int = 64, t0: float = 0.0) -> list[Segment]:
    return [Segment(t0 + 4.0 * i, t0 + 4.0 * i + 4, count * i, count) for i in range(n)]


def test_everything_is_returned_when_it_fits() -> None:
    segments = _clips(5)
    assert select_segments(segments, since=None, until=None, token_budget=320) == segments


def test_selection_is_uniform_and_within_budget() -> None:
    segments = _clips(100)
    chosen = select_segments(segments, since=None, until=None, token_budget=10 * 64)
    assert len(chosen) == 10
    assert chosen == sorted(chosen, key=lambda s: s.start)
    assert [s.start for s in chosen] == [4.0 * (10 * k + 5) for k in range(10)]


def test_time_range_limits_the_candidates() -> None:
    segments = _clips(100)
    chosen = select_segments(segments, since=100.0, until=200.0, token_budget=5 * 64)
    assert len(chosen) == 5
    assert all(s.end > 100.0 and s.start < 200.0 for s in chosen)
    assert select_segments(segments, since=1000.0, until=None, token_budget=640) == []


def test_gaps_are_never_selected_and_instants_in_gaps_take_a_neighbour() -> None:
    segments = [*_clips(2), gap(8.0, 100.0, 128, "disconnected"), *_clips(2, t0=100.0)]
    segments[3:] = [Segment(s.start, s.end, 128 + 64 * i, 64) for i, s in enumerate(segments[3:])]
    chosen = select_segments(segments, since=None, until=None, token_budget=192)
    assert all(not s.is_gap for s in chosen)
    assert sum(s.count for s in chosen) <= 192 and len(chosen) >= 2


def test_a_long_consolidated_segment_is_read_once() -> None:
    old = Segment(0.0, 400.0, 0, 64, level=5, kind="consolidated", merges=5, clips=100)
    recent = [Segment(400.0 + 4 * i, 404.0 + 4 * i, 64 + 64 * i, 64) for i in range(100)]
    chosen = select_segments([old, *recent], since=None, until=None, token_budget=4 * 64)
    assert chosen[0] == old and len(chosen) == 4
    assert len(set(chosen)) == len(chosen)


def test_budget_below_one_segment_gives_nothing() -> None:
    assert select_segments(_clips(3), since=None, until=None, token_budget=10) == []
    assert select_segments(_clips(3), since=None, until=None, token_budget=0) == []
