"""The scheduler's policy, without a model: clip feeds, job views and a simulated device clock."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from streamer.engine.feeds import ClipFeeds
from streamer.engine.scheduler import (
    ApplyGaps,
    DecodeStep,
    EncodeBatch,
    JobView,
    Maintenance,
    MemoryState,
    PrefillChunk,
    Retire,
    Scheduler,
    SchedulerPolicy,
    StartJob,
    WorkItem,
    memory_ready,
)
from streamer.engine.types import ALL_STREAMS
from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip, GapEvent

FRAMES = np.zeros((4, 2, 2, 3), dtype=np.uint8)
MEMORY = MemoryState(known=frozenset({"a", "b"}), with_tokens=frozenset({"a", "b"}))
FAR = 1e12  # a deadline that never passes


class Feeds:
    """Real ClipFeeds over real DropQueues, with a helper to put clips."""

    def __init__(self, names: Sequence[str] = ("a",)) -> None:
        self.feeds = ClipFeeds()
        self.queues: dict[str, DropQueue[Clip]] = {}
        self.seq: dict[str, int] = {}
        for name in names:
            self.queues[name] = DropQueue(1000, "drop_oldest", name=name)
            self.feeds.add(name, self.queues[name])
            self.seq[name] = 0

    def put(self, name: str, n: int = 1) -> None:
        for _ in range(n):
            i = self.seq[name]
            self.queues[name].put_nowait(Clip(name, i, FRAMES, 2.0 * i, 2.0 * i + 2.0))
            self.seq[name] += 1


def job(i: int, phase: str = "decode", **kw: object) -> JobView:
    fields: dict[str, object] = {"streams": ("a",), "deadline_at": FAR, **kw}
    return JobView(i, phase, **fields)  # type: ignore[arg-type]


async def test_nothing_to_do_is_none() -> None:
    assert Scheduler(SchedulerPolicy()).schedule(Feeds().feeds, [], MEMORY, 0.0) is None


async def test_cancelled_and_expired_jobs_retire_first() -> None:
    f = Feeds()
    f.put("a", 3)
    jobs = [job(1, cancelled=True), job(2, deadline_at=5.0), job(3)]
    item = Scheduler(SchedulerPolicy()).schedule(f.feeds, jobs, MEMORY, 10.0)
    assert item == Retire(cancelled=(1,), expired=(2,))


async def test_a_gap_lands_between_the_clips_around_it() -> None:
    f = Feeds()
    f.put("a", 2)  # 0-2, 2-4
    f.feeds.record_gap(GapEvent("a", 4.0, 10.0, "disconnected"))
    f.queues["a"].put_nowait(Clip("a", 9, FRAMES, 10.0, 12.0))
    s = Scheduler(SchedulerPolicy(encode_batch_clips=8))
    first = s.schedule(f.feeds, [], MEMORY, 0.0)
    assert isinstance(first, EncodeBatch) and [c.start for c in first.clips] == [0.0, 2.0]
    assert s.schedule(f.feeds, [], MEMORY, 0.0) == ApplyGaps(
        (GapEvent("a", 4.0, 10.0, "disconnected"),)
    )
    last = s.schedule(f.feeds, [], MEMORY, 0.0)
    assert isinstance(last, EncodeBatch) and [c.start for c in last.clips] == [10.0]


async def test_encode_batches_are_bounded_and_round_robin_across_streams() -> None:
    f = Feeds(("a", "b"))
    f.put("a", 5)
    f.put("b", 5)
    item = Scheduler(SchedulerPolicy(encode_batch_clips=4)).schedule(f.feeds, [], MEMORY, 0.0)
    assert isinstance(item, EncodeBatch)
    assert sorted(c.stream for c in item.clips) == ["a", "a", "b", "b"]


def simulate(
    scheduler: Scheduler,
    f: Feeds,
    jobs: list[JobView],
    steps: int,
    cost: dict[type, float],
    *,
    clips_per_encode: int = 1,
) -> list[WorkItem]:
    """Run the policy against a simulated device: each item costs ``cost[type]`` seconds and
    ingest refills the queue so clips always wait."""
    items: list[WorkItem] = []
    now = 0.0
    for _ in range(steps):
        f.put("a", clips_per_encode)
        item = scheduler.schedule(f.feeds, jobs, MEMORY, now)
        assert item is not None
        items.append(item)
        elapsed = cost[type(item)]
        now += elapsed
        scheduler.account(item, elapsed, now)
    return items


async def test_the_encoder_is_never_starved_by_answers() -> None:
    # Clips always wait and an answer is decoding: encode batches keep coming, and between two
    # of them the answer gets about as much device time as the batch took (query_share 0.5).
    s = Scheduler(SchedulerPolicy(encode_batch_clips=1, query_share=0.5))
    items = simulate(s, Feeds(), [job(1)], 60, {EncodeBatch: 0.125, DecodeStep: 0.03125})
    encodes = [i for i, item in enumerate(items) if isinstance(item, EncodeBatch)]
    assert len(encodes) >= 12
    runs = [b - a - 1 for a, b in itertools.pairwise(encodes)]
    assert runs and all(run == 4 for run in runs), runs  # 0.125 s of credit / 0.03125 s a step


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
async def test_a_query_gets_its_share_of_the_device(share: float) -> None:
    s = Scheduler(SchedulerPolicy(encode_batch_clips=1, query_share=share))
    cost = {EncodeBatch: 0.1, DecodeStep: 0.01}
    items = simulate(s, Feeds(), [job(1)], 400, cost)
    spent = {kind: sum(cost[kind] for item in items if type(item) is kind) for kind in cost}
    measured = spent[DecodeStep] / (spent[DecodeStep] + spent[EncodeBatch])
    assert measured == pytest.approx(share, abs=0.05)


async def test_encoding_waits_at_most_one_prefill_chunk_past_the_credit() -> None:
    # A long prefill (many chunks) while clips keep arriving: encoding comes back after every
    # chunk that exhausts the credit, so the longest encoder wait is one chunk, not the prefill.
    policy = SchedulerPolicy(encode_batch_clips=1, prefill_chunk_tokens=512)
    s = Scheduler(policy)
    jobs = [job(1, phase="prefill", prefill_left=32 * 512)]
    items = simulate(s, Feeds(), jobs, 40, {EncodeBatch: 0.05, PrefillChunk: 0.2})
    assert all(item.max_tokens == 512 for item in items if isinstance(item, PrefillChunk))
    kinds = [type(item) for item in items]
    assert PrefillChunk in kinds
    for a, b in itertools.pairwise(kinds):
        assert not (a is PrefillChunk and b is PrefillChunk), "two chunks without an encode"


async def test_decode_is_one_batched_step_over_every_answer() -> None:
    s = Scheduler(SchedulerPolicy(decode_batch_max=8))
    jobs = [job(i) for i in range(1, 6)]
    assert s.schedule(Feeds().feeds, jobs, MEMORY, 0.0) == DecodeStep((1, 2, 3, 4, 5))


async def test_decode_batches_rotate_when_more_answers_than_a_batch() -> None:
    s = Scheduler(SchedulerPolicy(decode_batch_max=2, max_in_flight=8))
    jobs = [job(i) for i in range(1, 6)]
    served: list[int] = []
    for _ in range(5):
        item = s.schedule(Feeds().feeds, jobs, MEMORY, 0.0)
        assert isinstance(item, DecodeStep) and len(item.job_ids) == 2
        served.extend(item.job_ids)
    assert {i: served.count(i) for i in range(1, 6)} == dict.fromkeys(range(1, 6), 2)


async def test_prefill_and_decode_alternate() -> None:
    s = Scheduler(SchedulerPolicy())
    jobs = [job(1), job(2), job(3, phase="prefill", prefill_left=5000)]
    kinds = [type(s.schedule(Feeds().feeds, jobs, MEMORY, 0.0)) for _ in range(6)]
    assert kinds == [DecodeStep, PrefillChunk] * 3


async def test_jobs_start_in_order_up_to_max_in_flight() -> None:
    s = Scheduler(SchedulerPolicy(max_in_flight=2))
    queued = [job(i, phase="queued") for i in (1, 2, 3)]
    assert s.schedule(Feeds().feeds, queued, MEMORY, 0.0) == StartJob(1)
    running = [job(1, phase="prefill", prefill_left=10), job(2), job(3, phase="queued")]
    assert not isinstance(s.schedule(Feeds().feeds, running, MEMORY, 0.0), StartJob)


async def test_a_job_waiting_for_memory_does_not_block_the_next() -> None:
    memory = MemoryState(known=frozenset({"a", "b"}), with_tokens=frozenset({"b"}))
    jobs = [job(1, phase="queued", streams=("a",)), job(2, phase="queued", streams=("b",))]
    s = Scheduler(SchedulerPolicy())
    assert s.schedule(Feeds().feeds, jobs, memory, 0.0) == StartJob(2)
    assert s.schedule(Feeds().feeds, jobs[:1], memory, 0.0) is None  # held, nothing to do
    # an unknown stream is not waited for: planning answers unknown_stream at once
    unknown = [job(3, phase="queued", streams=("nope",))]
    assert s.schedule(Feeds().feeds, unknown, memory, 0.0) == StartJob(3)
    # the held job's deadline wakes the engine
    assert s.next_deadline([replace(jobs[0], deadline_at=42.0)]) == 42.0


async def test_maintenance_runs_when_idle_and_is_not_starved_by_load() -> None:
    due = replace(MEMORY, maintenance_due=True)
    s = Scheduler(SchedulerPolicy(maintenance_slice_s=0.05, maintenance_max_wait_s=1.0))
    assert s.schedule(Feeds().feeds, [], due, 0.0) == Maintenance(0.05)
    f = Feeds()
    f.put("a", 100)
    busy = [s.schedule(f.feeds, [job(1)], due, t) for t in (0.0, 0.5)]
    assert not any(isinstance(item, Maintenance) for item in busy)
    assert s.schedule(f.feeds, [job(1)], due, 1.5) == Maintenance(0.05)


def test_a_failed_stream_is_not_waited_for() -> None:
    """Memory that will never come (the stream failed) is not waited for: planning answers."""
    empty = MemoryState(known=frozenset({"a", "b"}), with_tokens=frozenset())
    assert not memory_ready(("a",), empty)
    assert not memory_ready((ALL_STREAMS,), empty)
    a_failed = MemoryState(known=empty.known, with_tokens=frozenset(), failed=frozenset({"a"}))
    assert memory_ready(("a",), a_failed)
    assert not memory_ready(("a", "b"), a_failed)  # b may still start
    assert not memory_ready((ALL_STREAMS,), a_failed)
    both = MemoryState(known=empty.known, with_tokens=frozenset(), failed=empty.known)
    assert memory_ready((ALL_STREAMS,), both)
