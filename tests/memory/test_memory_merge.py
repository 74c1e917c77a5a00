"""Size-weighted token merging and the consolidation / forget planners, on tiny inputs."""

from __future__ import annotations

import pytest
import torch

from memory.consolidation import plan_consolidation, plan_forget, segment_means
from memory.merge import merge_tokens
from memory.segments import GAP_EVICTED, GAP_FORGOTTEN, Segment, check_index, gap


def test_merge_tokens_keeps_the_weighted_sum_and_reaches_target() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g)
    sizes = torch.arange(1, 11, dtype=torch.float32)
    merged, merged_sizes = merge_tokens(x, sizes, 3)
    assert merged.shape == (3, 4) and merged_sizes.shape == (3,)
    assert merged_sizes.sum() == pytest.approx(float(sizes.sum()))
    torch.testing.assert_close((merged * merged_sizes[:, None]).sum(0), (x * sizes[:, None]).sum(0))


def test_merge_tokens_merges_the_most_similar_tokens_first() -> None:
    # tokens 0 and 1 are identical, token 2 and 3 far from them and from each other
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    merged, sizes = merge_tokens(x, torch.ones(4), 3)
    torch.testing.assert_close(merged, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    torch.testing.assert_close(sizes, torch.tensor([2.0, 1.0, 1.0]))


def test_merge_tokens_size_weights_the_mean() -> None:
    x = torch.tensor([[0.0, 1.0], [3.0, 1.0]])
    merged, sizes = merge_tokens(x, torch.tensor([3.0, 1.0]), 1)
    torch.testing.assert_close(merged, torch.tensor([[0.75, 1.0]]))
    assert float(sizes[0]) == 4.0


def test_merge_tokens_returns_a_copy_when_nothing_to_do() -> None:
    x = torch.ones(2, 3)
    merged, _ = merge_tokens(x, torch.ones(2), 5)
    merged += 1
    assert float(x.sum()) == 6.0
    with pytest.raises(ValueError):
        merge_tokens(x, torch.ones(2), 0)


def _clips(n: int, count: int = 4, hidden: int = 2) -> tuple[list[Segment], torch.Tensor]:
    segments = [Segment(4.0 * i, 4.0 * i + 4, count * i, count) for i in range(n)]
    return segments, torch.zeros(n * count, hidden)


def _plan(segments: list[Segment], tokens: torch.Tensor, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "window_start": 1e9,
        "policy": "merge",
        "merge_target_tokens": 4,
    }
    args.update(kw)
    target = int(args.pop("target", 0))  # type: ignore[call-overload]
    plan = plan_consolidation(
        segments,
        segment_means(tokens, segments),
        target_tokens=target,
        hard_target_tokens=int(args.pop("hard", target)),  # type: ignore[call-overload]
        **args,  # type: ignore[arg-type]
    )
    check_index([r.segment for r in plan.recipes], plan.tokens)
    return plan


def test_merge_picks_the_most_similar_adjacent_pair() -> None:
    segments, tokens = _clips(4)
    tokens[0:4] = torch.tensor([1.0, 0.0])
    tokens[4:8] = torch.tensor([0.0, 1.0])
    tokens[8:12] = torch.tensor([0.0, 1.0])  # clips 1 and 2 are alike
    tokens[12:16] = torch.tensor([-1.0, 0.3])
    plan = _plan(segments, tokens, target=12)
    assert plan.folded_pairs == 1
    merged = [r for r in plan.recipes if r.combine == "merge"]
    assert len(merged) == 1 and merged[0].sources == (segments[1], segments[2])
    seg = merged[0].segment
    assert (seg.start, seg.end, seg.count, seg.level, seg.kind) == (4.0, 12.0, 4, 1, "consolidated")


def test_merge_prefers_old_pairs_when_alike() -> None:
    segments, tokens = _clips(5)
    tokens[:] = 1.0
    plan = _plan(segments, tokens, target=16)
    merged = [r for r in plan.recipes if r.combine == "merge"]
    assert merged[0].sources == (segments[0], segments[1])


def test_merge_count_spreads_merges_over_the_history() -> None:
    segments, tokens = _clips(8)
    tokens[:] = 1.0
    plan = _plan(segments, tokens, target=16)  # four pairs must fold
    assert [r.segment.level for r in plan.recipes] == [1, 1, 1, 1]


def test_thin_keeps_every_other_clip_as_it_is() -> None:
    segments, tokens = _clips(6)
    plan = _plan(segments, tokens, target=12, policy="thin")
    assert [r.combine for r in plan.recipes] == ["first", "first", "first"]
    assert [r.sources[0] for r in plan.recipes] == [segments[0], segments[2], segments[4]]
    assert [(r.segment.start, r.segment.end) for r in plan.recipes] == [(0, 8), (8, 16), (16, 24)]


def test_recent_window_and_gaps_are_never_consolidated() -> None:
    segments, tokens = _clips(6)
    # a gap between clips 1 and 2, recorded without tokens
    segments = [
        *segments[:2],
        gap(8.0, 9.0, 8, "disconnected"),
        *[Segment(s.start + 1, s.end + 1, s.offset, s.count) for s in segments[2:]],
    ]
    plan = _plan(segments, tokens, target=16, hard=24, window_start=17.0)
    kept_recent = [r for r in plan.recipes if r.segment.end > 17.0]
    assert all(r.combine == "keep" for r in kept_recent)
    assert any(r.segment.is_gap and r.segment.reason == "disconnected" for r in plan.recipes)
    # only the pair before the gap could fold; the window shrinks no further than needed
    assert plan.tokens <= 24


def test_window_shrinks_then_segments_are_evicted_when_nothing_else_fits() -> None:
    segments, tokens = _clips(4)
    plan = _plan(segments, tokens, target=8, window_start=0.0)
    assert plan.tokens <= 8 and plan.window_start > 0.0 and plan.evicted == 0
    # islands between gaps cannot merge: the oldest one is evicted
    islands = [
        segments[0], gap(4, 5, 4, "x"),
        Segment(5, 9, 4, 4), gap(9, 10, 8, "x"),
        Segment(10, 14, 8, 4),
    ]  # fmt: skip
    plan = _plan(islands, torch.zeros(12, 2), target=8, window_start=0.0)
    assert plan.evicted == 1 and plan.tokens == 8
    assert plan.recipes[0].segment.reason == GAP_EVICTED
    assert plan.recipes[0].segment.end == 4.0 and plan.recipes[1].segment.reason == "x"


def test_forget_removes_whole_segments_and_trims_gaps() -> None:
    segments = [
        Segment(0, 4, 0, 4), Segment(4, 8, 4, 4), gap(8, 20, 8, "disconnected"),
        Segment(20, 24, 8, 4),
    ]  # fmt: skip
    recipes = plan_forget(segments, 6.0, 10.0)
    assert recipes is not None
    index = [r.segment for r in recipes]
    check_index(index, 8)
    assert [(s.start, s.end, s.reason) for s in index] == [
        (0, 4, None), (4, 10, GAP_FORGOTTEN), (10, 20, "disconnected"), (20, 24, None),
    ]  # fmt: skip
    assert plan_forget(segments, 30.0, 40.0) is None
