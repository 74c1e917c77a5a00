"""Consolidation as maintenance: planned off the device thread, written in bounded steps."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from memory.bank import MemoryBank
from memory.merge import merge_tokens, merge_tokens_batched
from memory.segments import Segment, check_index
from memory.settings import MemorySettings
from memory.snapshot import folder_for, read_stream
from memory.stream import StreamMemory
from memory.writer import Commit, RecordChunk, SnapshotWriter

Clip = Callable[..., torch.Tensor]
HIDDEN = 8


def _stream(policy: str, clips: int) -> StreamMemory:
    settings = MemorySettings(policy=policy, recent_window_s=16.0)
    return StreamMemory(
        "cam", clips * 64, settings, hidden_size=HIDDEN, dtype=torch.float32,
        device=torch.device("cpu"),
    )  # fmt: skip


def _noisy_clip(i: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(i)
    return torch.randn(64, HIDDEN, generator=generator) + (i % 5)


def _fill(memory: StreamMemory, first: int, last: int) -> None:
    for i in range(first, last):
        memory.append_clip(_noisy_clip(i), 4.0 * i, 4.0 * i + 4)


@pytest.mark.parametrize("policy", ["merge", "thin"])
@pytest.mark.parametrize("step_rows", [1, 64, 300])
def test_a_plan_written_in_steps_with_appends_between_equals_the_inline_write(
    policy: str, step_rows: int
) -> None:
    inline, sliced = _stream(policy, 40), _stream(policy, 40)
    for memory in (inline, sliced):
        _fill(memory, 0, 36)
        memory.add_gap(144.0, 150.0, "disconnected")
        _fill(memory, 38, 39)
    inputs = sliced.plan_inputs()
    plan = inputs.plan()
    assert plan.folded_pairs > 0
    assert inline.start_commit(inline.plan_inputs(), plan)
    inline.settle()
    _fill(inline, 39, 42)

    assert sliced.start_commit(inputs, plan)
    before = sliced.view(threading.RLock())
    expected = before.tokens(before.segments)
    steps, appended = 0, 39
    while sliced.committing:
        sliced.commit_step(step_rows)
        steps += 1
        if appended < 42 and steps % 2 == 0:
            _fill(sliced, appended, appended + 1)  # ingest goes on between steps
            appended += 1
        # between steps the index reads as a time line; rows may have a hole
        spans = [(s.start, s.end) for s in sliced.segments]
        assert all(a[1] == pytest.approx(b[0]) for a, b in itertools.pairwise(spans))
    _fill(sliced, appended, 42)
    assert steps > 1 or step_rows > 1000
    assert sliced.segments == inline.segments
    check_index(sliced.segments, sliced.tokens)
    n = sliced.tokens
    torch.testing.assert_close(sliced.arena.storage[:n], inline.arena.storage[:n])
    torch.testing.assert_close(sliced.arena.sizes[:n], inline.arena.sizes[:n])
    # a view taken before the commit still reads what it saw
    assert torch.equal(before.tokens(before.segments), expected)
    assert sliced.consolidations == inline.consolidations == 1


def test_a_plan_made_before_a_forget_is_dropped() -> None:
    memory = _stream("merge", 40)
    _fill(memory, 0, 39)
    inputs = memory.plan_inputs()
    memory.forget(0.0, 8.0)
    assert not memory.start_commit(inputs, inputs.plan())
    assert not memory.committing


def test_batched_merges_equal_one_at_a_time() -> None:
    generator = torch.Generator().manual_seed(3)
    for n, target in [(128, 64), (200, 64), (65, 64), (9, 2)]:
        tokens = torch.randn(6, n, 16, generator=generator)
        sizes = torch.rand(6, n, generator=generator) + 0.5
        merged, merged_sizes = merge_tokens_batched(tokens, sizes, target)
        assert merged.shape == (6, target, 16)
        for i in range(6):
            one, one_sizes = merge_tokens(tokens[i], sizes[i], target)
            torch.testing.assert_close(merged[i], one, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(merged_sizes[i], one_sizes)


def test_the_bank_consolidates_as_maintenance_and_never_inline(
    bank_factory: Callable[..., MemoryBank], clip: Clip, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk_mb = 64 * (HIDDEN * 4 + 4) / 2**20  # one clip's rows per piece
    bank = bank_factory(10, recent_window_s=12.0, consolidate_at=0.8, maintenance_chunk_mb=chunk_mb)
    inline_calls: list[int] = []
    original = StreamMemory._make_room

    def counted(self: StreamMemory, **kwargs: object) -> None:
        inline_calls.append(1)
        original(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StreamMemory, "_make_room", counted)
    for i in range(60):
        bank.append_clip("cam", clip(float(i % 9)), 4.0 * i, 4.0 * i + 4)
        deadline = time.monotonic() + 30.0
        while bank.maintenance_due() or bank._plans:  # the planner thread may still be at work
            bank.run_maintenance(budget_s=0.0)  # one piece per call
            if time.monotonic() > deadline:
                pytest.fail("maintenance did not settle")
            time.sleep(0.001)
        stats = bank.stats("cam", 1.0)
        check_index(bank.view("cam").segments, stats.tokens)
    stats = bank.stats("cam", 1.0)
    assert stats.consolidations >= 3 and stats.span == (0.0, 240.0)
    assert inline_calls == []  # every pass ran as maintenance
    bank.close()


def test_the_writer_waits_for_an_asynchronous_copy_before_it_reads_the_rows(
    tmp_path: Path,
) -> None:
    """A chunk whose device -> host copy may still run (a GPU) carries its event: the writer
    thread waits for it before it reads the rows, so the device thread never has to."""
    writer = SnapshotWriter(
        tmp_path, fingerprint="f", dtype=torch.float32, hidden_size=8,
        compact_ratio=0.5, max_queued=4,
    )  # fmt: skip
    tokens = torch.zeros(4, 8)  # what the copy will have written once "done"
    events: list[str] = []

    class Copy:  # stands in for a torch.cuda.Event: the rows arrive when it is waited for
        def synchronize(self) -> None:
            events.append("waited")
            tokens.fill_(1.0)

    segment = Segment(start=0.0, end=1.0, offset=0, count=4)
    chunk = RecordChunk("cam", 1, (segment,), tokens, torch.ones(4), Copy())
    assert writer.offer(chunk) and writer.offer(Commit("cam", 1, 1, (segment,), 0.0))
    assert writer.wait_idle(30.0)
    writer.close()
    assert events == ["waited"] and not writer.health().failures
    stored = read_stream(
        folder_for(tmp_path, "cam"), fingerprint="f", dtype=torch.float32, hidden_size=8
    )
    assert torch.equal(stored.tokens, torch.ones(4, 8))  # the rows as of after the copy
