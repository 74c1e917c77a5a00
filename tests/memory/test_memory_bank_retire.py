"""A stream whose source failed for good hands its unused memory share to the others."""

from __future__ import annotations

from collections.abc import Callable

import torch

from memory.bank import MemoryBank

CLIP_TOKENS = 64  # tests/memory/conftest.py's clips


def test_a_failed_streams_share_goes_back_to_the_others(
    bank_factory: Callable[..., MemoryBank], clip: Callable[..., torch.Tensor]
) -> None:
    bank = bank_factory(20, streams=("gate", "failed", "lobby"))
    equal = bank.stats("gate", fps=1.0).budget_tokens
    assert bank.stats("failed", fps=1.0).budget_tokens == equal
    for i in range(3):  # the failed stream saw three clips before its source died
        bank.append_clip("failed", clip(float(i)), 4.0 * i, 4.0 * i + 4)

    bank.retire_stream("failed")

    held = 3 * CLIP_TOKENS
    assert bank.stats("failed", fps=1.0).budget_tokens == held  # keeps its history, no more
    assert bank.view("failed").tokens_held == held
    grown = bank.stats("gate", fps=1.0).budget_tokens
    assert grown == bank.stats("lobby", fps=1.0).budget_tokens > equal
    total = bank.budget_bytes // bank.token_bytes
    assert 2 * grown + held <= total and 2 * grown + held >= total - 2
    bank.retire_stream("failed")  # idempotent
    assert bank.stats("gate", fps=1.0).budget_tokens == grown


def test_removing_a_retired_stream_forgets_that_it_was_retired(
    bank_factory: Callable[..., MemoryBank],
) -> None:
    bank = bank_factory(20, streams=("gate", "failed"))
    bank.retire_stream("failed")
    bank.remove_stream("failed")
    bank.add_stream("failed")
    assert bank.stats("failed", fps=1.0).budget_tokens == bank.stats("gate", fps=1.0).budget_tokens
