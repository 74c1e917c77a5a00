"""Property tests: whatever the sequence of appends, gaps and forgets, the invariants hold.

- the stream never holds more than its share after an operation returns;
- segments are time-ordered, non-overlapping, and with the gaps cover the whole history from the
  first instant to the last;
- token counts match the arena rows;
- a view reads exactly the tokens it saw when taken, whatever happened since.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from memory.bank import MemoryBank
from memory.errors import MemoryStoreError
from memory.segments import check_index
from memory.settings import MemorySettings
from memory.view import MemoryView

HIDDEN = 4


@dataclass(frozen=True)
class Append:
    count: int
    duration: float
    hole: float


@dataclass(frozen=True)
class Gap:
    length: float
    reason: str
    back: float  # start this many seconds before the newest end (late outage reports)


@dataclass(frozen=True)
class Forget:
    at: float  # fraction of the history
    length: float  # fraction of the history


@dataclass(frozen=True)
class TakeView:
    pass


@dataclass(frozen=True)
class JoinStream:
    pass


appends = st.builds(
    Append,
    count=st.sampled_from([64, 64, 64, 1, 17, 80]),
    duration=st.floats(0.5, 8.0),
    hole=st.sampled_from([0.0, 0.0, 0.0, 0.3, 5.0, 60.0]),
)
operations = st.one_of(
    appends,
    appends,
    appends,
    appends,
    st.builds(
        Gap,
        length=st.floats(0.5, 120.0),
        reason=st.sampled_from(["disconnected", "stalled"]),
        back=st.sampled_from([0.0, 0.0, 30.0]),
    ),
    st.builds(Forget, at=st.floats(0.0, 1.0), length=st.floats(0.0, 0.5)),
    st.just(TakeView()),
    st.just(JoinStream()),
)

memory_settings = st.builds(
    lambda clips, policy, window, target, low_water, tolerance: MemorySettings(
        budget_mb=clips * 64 * HIDDEN * 4 / 2**20,
        policy=policy,
        recent_window_s=window,
        merge_target_tokens=target,
        consolidate_to=low_water,
        gap_tolerance_s=tolerance,
    ),
    clips=st.integers(3, 10),
    policy=st.sampled_from(["merge", "thin"]),
    window=st.sampled_from([0.0, 10.0, 60.0, 10_000.0]),
    target=st.sampled_from([16, 32, 64]),
    low_water=st.sampled_from([0.5, 0.9, 1.0]),
    tolerance=st.sampled_from([0.0, 1.0]),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    config=memory_settings,
    ops=st.lists(operations, min_size=20, max_size=80),
    seed=st.integers(0, 9),
)
def test_invariants_hold_for_any_sequence(
    config: MemorySettings, ops: list[object], seed: int
) -> None:
    bank = MemoryBank(
        config, hidden_size=HIDDEN, dtype=torch.float32, device=torch.device("cpu"), fingerprint="p"
    )
    bank.add_stream("cam")
    generator = torch.Generator().manual_seed(seed)
    views: list[tuple[MemoryView, torch.Tensor]] = []
    first: float | None = None
    now = 1000.0
    joined = 0
    for op in ops:
        if isinstance(op, Append):
            start = now + op.hole
            tokens = torch.randn(op.count, HIDDEN, generator=generator)
            bank.append_clip("cam", tokens, start, start + op.duration)
            first = start if first is None else first
            now = start + op.duration
        elif isinstance(op, Gap):
            start = now - op.back if first is not None else now
            bank.add_gap("cam", start, start + op.length, op.reason)
            first = start if first is None else first
            now = max(now, start + op.length)
        elif isinstance(op, Forget) and first is not None:
            lo = first + op.at * (now - first)
            bank.forget("cam", lo, lo + op.length * (now - first))
        elif isinstance(op, TakeView):
            view = bank.view("cam")
            views.append((view, view.tokens(view.segments)))
        elif isinstance(op, JoinStream) and joined < 1:
            joined += 1
            try:
                bank.add_stream(f"other{joined}")  # the share halves: history must fit again
            except MemoryStoreError as exc:  # refused whole when a share would be too small
                assert "budget too small" in str(exc)
                assert bank.streams() == ["cam"]
        _check_invariants(bank, first, now)
    stats = bank.stats("cam", fps=1.0)
    event(f"consolidated={stats.consolidations > 0}")
    event(f"evicted={stats.evicted > 0}")
    event(f"window shrank={stats.window_s is not None and stats.window_s < config.recent_window_s}")
    for view, expected in views:
        torch.testing.assert_close(view.tokens(view.segments), expected, rtol=0, atol=0)


def _check_invariants(bank: MemoryBank, first: float | None, now: float) -> None:
    memory = bank._streams["cam"]
    stats = bank.stats("cam", fps=1.0)
    assert stats.tokens <= stats.budget_tokens, "budget exceeded"
    assert memory.arena.used == stats.tokens
    view = bank.view("cam")
    check_index(view.segments, memory.arena.used)
    if first is None:
        assert view.span is None
    else:
        assert view.span == (first, now), "history not covered from first to last instant"
