"""Budget arithmetic: bytes per token, shares, hours of history."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from memory.bank import MemoryBank
from memory.capacity import budget_bytes, bytes_per_token, capacity_hours, stream_shares
from memory.errors import MemoryStoreError
from memory.settings import MemorySettings


def test_bytes_per_token_is_hidden_times_dtype() -> None:
    assert bytes_per_token(1536, 2) == 3072
    assert bytes_per_token(3584, 2) == 7168
    with pytest.raises(ValueError):
        bytes_per_token(0, 2)


def test_design_numbers_one_hour_at_one_fps() -> None:
    # DESIGN: 57,600 tokens per hour at 1 fps (16 per frame); 0.18 GB for H=1536 in bf16.
    tokens_per_hour = 57_600
    assert capacity_hours(tokens_per_hour, fps=1.0, tokens_per_frame=16) == pytest.approx(1.0)
    assert capacity_hours(tokens_per_hour, fps=2.0, tokens_per_frame=16) == pytest.approx(0.5)
    assert tokens_per_hour * bytes_per_token(1536, 2) / 1e9 == pytest.approx(0.177, abs=1e-3)
    assert capacity_hours(100, fps=0.0, tokens_per_frame=16) is None


def test_shares_are_equal_by_default_and_follow_weights() -> None:
    total = budget_bytes(1.0)  # 1 MiB
    assert total == 2**20
    equal = stream_shares(total, 16, ["a", "b"], {})
    assert equal == {"a": 2**20 // 16 // 2, "b": 2**20 // 16 // 2}
    weighted = stream_shares(total, 16, ["a", "b", "c"], {"a": 2.0})
    assert weighted["a"] == pytest.approx(2 * weighted["b"], abs=1)
    assert weighted["b"] == weighted["c"]
    assert sum(weighted.values()) <= total // 16


def test_bank_recomputes_shares_when_streams_join(bank_factory: Callable[..., MemoryBank]) -> None:
    bank = bank_factory(40, streams=("a",))
    alone = bank.stats("a", fps=1.0).budget_tokens
    bank.add_stream("b")
    assert bank.stats("a", fps=1.0).budget_tokens == alone // 2
    assert bank.stats("b", fps=1.0).budget_tokens == alone // 2
    bank.remove_stream("b")
    assert bank.stats("a", fps=1.0).budget_tokens == alone


def test_shrinking_share_consolidates_existing_history(
    bank_factory: Callable[..., MemoryBank], clip: Callable[..., torch.Tensor]
) -> None:
    bank = bank_factory(20, streams=("a",), recent_window_s=0)
    for i in range(20):
        bank.append_clip("a", clip(float(i)), 4.0 * i, 4.0 * i + 4)
    assert bank.stats("a", fps=1.0).fill == pytest.approx(1.0)
    bank.add_stream("b")
    stats = bank.stats("a", fps=1.0)
    assert stats.tokens <= stats.budget_tokens == 640
    assert stats.span == (0.0, 80.0)  # the whole history is still covered


def test_stats_report_bytes_and_capacity(bank_factory: Callable[..., MemoryBank]) -> None:
    bank = bank_factory(10, hidden=8, dtype=torch.float16)
    stats = bank.stats("cam", fps=0.5)
    assert stats.budget_tokens == 640
    assert stats.budget_bytes == 640 * 8 * 2
    assert stats.capacity_hours == pytest.approx(640 / (16 * 0.5 * 3600))
    assert stats.tokens == 0 and stats.span is None and stats.fill == 0.0


def test_budget_too_small_for_a_stream_is_refused() -> None:
    settings = MemorySettings(budget_mb=100 * 8 * 4 / 2**20)  # 100 tokens of H=8 float32
    bank = MemoryBank(
        settings, hidden_size=8, dtype=torch.float32, device=torch.device("cpu"), fingerprint="f"
    )
    with pytest.raises(MemoryStoreError, match="budget too small"):
        bank.add_stream("a")


def test_settings_reject_unknown_keys_and_bad_bounds() -> None:
    with pytest.raises(ValueError):
        MemorySettings.model_validate({"budget_mb": 1, "budgetmb": 2})
    with pytest.raises(ValueError):
        MemorySettings(budget_mb=-1)
    with pytest.raises(ValueError):
        MemorySettings(stream_weights={"a": 0.0})
