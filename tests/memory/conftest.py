"""Tiny banks for memory tests: small hidden sizes, budgets counted in clips."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from memory.bank import MemoryBank
from memory.settings import MemorySettings

HIDDEN = 8
CLIP_TOKENS = 64


def budget_mb_for(
    clips: float, *, hidden: int = HIDDEN, dtype_bytes: int = 4, streams: int = 1
) -> float:
    """A ``budget_mb`` that gives each of ``streams`` equal streams ``clips`` clips of 64 tokens."""
    return clips * CLIP_TOKENS * hidden * dtype_bytes * streams / 2**20


def make_bank(
    clips: float = 20,
    *,
    streams: tuple[str, ...] = ("cam",),
    hidden: int = HIDDEN,
    dtype: torch.dtype = torch.float32,
    fingerprint: str = "tiny-test",
    **settings: Any,
) -> MemoryBank:
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    config = MemorySettings(
        budget_mb=budget_mb_for(
            clips, hidden=hidden, dtype_bytes=dtype_bytes, streams=len(streams)
        ),
        **settings,
    )
    bank = MemoryBank(
        config, hidden_size=hidden, dtype=dtype, device=torch.device("cpu"), fingerprint=fingerprint
    )
    for name in streams:
        bank.add_stream(name)
    return bank


def clip_tokens(value: float, count: int = CLIP_TOKENS, hidden: int = HIDDEN) -> torch.Tensor:
    """A clip whose every token is ``value`` plus a fixed small pattern (distinct per value)."""
    pattern = torch.linspace(0.0, 1.0, hidden)
    return value + pattern.expand(count, hidden).clone()


@pytest.fixture
def bank_factory() -> Callable[..., MemoryBank]:
    return make_bank


@pytest.fixture
def clip() -> Callable[..., torch.Tensor]:
    return clip_tokens


@pytest.fixture
def budget_for() -> Callable[..., float]:
    return budget_mb_for
