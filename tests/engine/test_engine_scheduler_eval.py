"""Evaluation (standing-query scoring) as its own work class: its share of the device."""

from __future__ import annotations

import pytest

from streamer.engine.scheduler import (
    DecodeStep,
    EncodeBatch,
    Scheduler,
    SchedulerPolicy,
    ScoreBatch,
    WorkItem,
)
from tests.engine.test_engine_scheduler import MEMORY, Feeds, job

COST_S = {EncodeBatch: 1.0, ScoreBatch: 0.05, DecodeStep: 0.03}  # simulated device seconds


def simulate(
    share: float, *, clips: bool, queries: bool, steps: int = 4000
) -> tuple[dict[type, float], int]:
    """Always-waiting work of the given classes; device seconds per class, and the most
    evaluation items that ran in a row while clips waited."""
    scheduler = Scheduler(SchedulerPolicy(evaluation_share=share, encode_batch_clips=1))
    feeds = Feeds()
    jobs = [job(1)] if queries else []
    used: dict[type, float] = {EncodeBatch: 0.0, ScoreBatch: 0.0, DecodeStep: 0.0}
    now, run, longest = 0.0, 0, 0
    for _ in range(steps):
        if clips:
            feeds.put("a")
        item: WorkItem | None = scheduler.schedule(feeds.feeds, jobs, MEMORY, now, rounds=(7,))
        assert item is not None
        cost = COST_S[type(item)]
        used[type(item)] += cost
        now += cost
        scheduler.account(item, cost, now)
        run = run + 1 if isinstance(item, ScoreBatch) else 0
        longest = max(longest, run)
    return used, longest


@pytest.mark.parametrize("share", [0.1, 0.2, 0.4])
async def test_evaluation_takes_its_share_while_clips_wait(share: float) -> None:
    used, longest = simulate(share, clips=True, queries=False)
    fraction = used[ScoreBatch] / sum(used.values())
    assert fraction == pytest.approx(share, abs=0.02)
    # an encode batch waits at most for the credit one batch earned, plus one chunk
    assert longest * COST_S[ScoreBatch] <= share / (1 - share) * COST_S[EncodeBatch] + 0.05 + 1e-9


async def test_evaluation_shares_with_queries_when_no_clips_wait() -> None:
    used, _ = simulate(0.2, clips=False, queries=True)
    fraction = used[ScoreBatch] / (used[ScoreBatch] + used[DecodeStep])
    assert fraction == pytest.approx(0.2, abs=0.02)


async def test_evaluation_alone_takes_the_idle_device() -> None:
    used, _ = simulate(0.2, clips=False, queries=False, steps=100)
    assert used[EncodeBatch] == used[DecodeStep] == 0.0 and used[ScoreBatch] > 0.0


async def test_no_rounds_no_evaluation() -> None:
    scheduler = Scheduler(SchedulerPolicy())
    feeds = Feeds()
    assert scheduler.schedule(feeds.feeds, [], MEMORY, 0.0) is None
    assert isinstance(scheduler.schedule(feeds.feeds, [], MEMORY, 0.0, rounds=(3,)), ScoreBatch)
    with pytest.raises(ValueError):
        SchedulerPolicy(evaluation_share=1.0)
