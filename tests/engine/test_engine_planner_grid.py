"""A stable selection: over budget, the open end snaps to a grid, so prefix KV reuse hits."""

from __future__ import annotations

import dataclasses

import torch

from memory.bank import MemoryBank
from memory.settings import MemorySettings
from model.prompt import byte_level_tokenizer
from streamer.engine.planner import PlanLimits, plan_query
from streamer.engine.runner import prefix_key

T0 = 1_800_000_000.0
H = 8
LIMITS = PlanLimits(
    max_context_tokens=4096,
    max_visual_tokens=512,  # 8 clips of 64 tokens
    tokens_per_frame=16,
    reserve_new_tokens=64,
    selection_grid_s=20.0,
)
TOKENIZER = byte_level_tokenizer()


def bank_of(clips: int) -> MemoryBank:
    bank = MemoryBank(
        MemorySettings(budget_mb=8.0), hidden_size=H, dtype=torch.float32,
        device=torch.device("cpu"), fingerprint="test",
    )  # fmt: skip
    bank.add_stream("cam")
    for i in range(clips):
        bank.append_clip("cam", torch.full((64, H), float(i)), T0 + 2.0 * i, T0 + 2.0 * i + 2.0)
    return bank


def selection(bank: MemoryBank, limits: PlanLimits, question: str = "What?") -> tuple:
    plan = plan_query(question, [bank.view("cam")], TOKENIZER, limits)
    return tuple((s.start, s.end) for part in plan.parts for s in part.segments)


def test_over_budget_the_selection_holds_while_clips_land_within_a_grid_step() -> None:
    bank = bank_of(40)  # T0 .. T0+80 (a multiple of the grid)
    first = selection(bank, LIMITS)
    for n in range(41, 50):  # nine more clips: up to T0+98, still inside the next grid step
        bank.append_clip("cam", torch.full((64, H), float(n)), T0 + 2.0 * (n - 1), T0 + 2.0 * n)
        assert selection(bank, LIMITS) == first
    bank.append_clip("cam", torch.full((64, H), 50.0), T0 + 98.0, T0 + 100.0)
    assert selection(bank, LIMITS) != first  # the next grid step moves it
    # without the grid every clip moves the instants
    plain = dataclasses.replace(LIMITS, selection_grid_s=0.0)
    assert selection(bank_of(40), plain) != selection(bank_of(41), plain)


def test_a_selection_that_fits_is_never_snapped() -> None:
    bank = bank_of(5)  # 320 tokens, within the 512 budget
    picked = selection(bank, LIMITS)
    assert picked[-1] == (T0 + 8.0, T0 + 10.0)  # the newest clip is read


def test_the_prefix_key_is_the_same_for_every_question_on_one_selection() -> None:
    bank = bank_of(40)
    view = [bank.view("cam")]
    a = plan_query("What happened?", view, TOKENIZER, LIMITS)
    b = plan_query("Who came in, and when exactly did they leave?", view, TOKENIZER, LIMITS)
    assert prefix_key(a) == prefix_key(b)
    bank.append_clip("cam", torch.full((64, H), 99.0), T0 + 80.0, T0 + 82.0)
    c = plan_query("What happened?", [bank.view("cam")], TOKENIZER, dataclasses.replace(
        LIMITS, selection_grid_s=0.0))  # fmt: skip
    assert prefix_key(c) != prefix_key(a)
