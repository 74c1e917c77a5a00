"""Suffixes of several questions resumed from one prefix as one batched forward: each row's
logits equal its own ``PrefillJob.resume`` (ragged lengths, every drop plan, chunked or not)."""

from __future__ import annotations

import pytest
import torch

from model.prefill import PrefillJob, prefix_job
from model.qwen2 import DropPlan
from model.suffix_batch import SuffixBatch
from tests.model.test_model_engine_paths import ATOL, CONFIG, PLAN_IDS, PLANS, prompt, tiny_lm

SUFFIXES = (9, 1, 15, 9, 4)  # ragged, with a repeated length


def question(seed: int, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, rows, CONFIG.hidden_size, generator=generator)


@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("chunk", [None, 7])
def test_each_row_equals_its_own_resumed_prefill(plan: DropPlan | None, chunk: int | None) -> None:
    lm = tiny_lm()
    header, visual = 6, 40
    state = prefix_job(lm, prompt(7, header, visual, 0)[0], visual_start=header, drop=plan,
                       chunk_tokens=chunk).run_prefix()  # fmt: skip
    questions = [question(20 + i, rows) for i, rows in enumerate(SUFFIXES)]
    batch = SuffixBatch(lm, state, questions, chunk_tokens=chunk)
    steps = 0
    while not batch.step():
        steps += 1
    assert batch.logits is not None and batch.logits.shape == (len(SUFFIXES), CONFIG.vocab_size)
    for row, q in enumerate(questions):
        alone = PrefillJob.resume(lm, state, q, chunk_tokens=chunk).run()
        torch.testing.assert_close(batch.logits[row], alone.logits[0, -1], atol=ATOL, rtol=0)
    if chunk is not None:
        assert steps >= 3  # chunked: several small steps, not one big one
    assert state.kv[0][0].shape[0] == 1  # the shared state was not changed


def test_one_suffix_and_bad_input() -> None:
    lm = tiny_lm()
    state = prefix_job(lm, prompt(3, 4, 16, 0)[0], visual_start=4, drop=PLANS[3]).run_prefix()
    q = question(5, 6)
    alone = PrefillJob.resume(lm, state, q).run().logits[0, -1]
    torch.testing.assert_close(SuffixBatch(lm, state, [q]).run()[0], alone, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        SuffixBatch(lm, state, [])
    with pytest.raises(ValueError):
        SuffixBatch(lm, state, [q[0]])
    with pytest.raises(ValueError):
        SuffixBatch(lm, state, [q], chunk_tokens=0)


def test_only_the_asked_logit_columns() -> None:
    lm = tiny_lm()
    state = prefix_job(lm, prompt(4, 4, 16, 0)[0], visual_start=4, drop=PLANS[2]).run_prefix()
    questions = [question(8, 3), question(9, 11)]
    full = SuffixBatch(lm, state, questions).run()
    two = SuffixBatch(lm, state, questions, token_ids=(5, 42), chunk_tokens=5).run()
    assert two.shape == (2, 2)
    torch.testing.assert_close(two, full[:, [5, 42]], atol=ATOL, rtol=0)
