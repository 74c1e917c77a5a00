"""The engine's model paths on a seeded tiny LM: pooled KV, batched decode, chunked prefill and
prefix reuse all give what a plain one-shot prefill and one-at-a-time decoding give."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model.errors import KVCapacityError, KVPoolExhausted
from model.generation import GenerationSession, SamplingParams, decode_batch, generate
from model.kv import KVCache, KVPool, layer_capacity
from model.prefill import PrefillJob, PrefixCache, prefix_job, prefix_stop_layer
from model.qwen2 import ROPE_MIN_ROWS, DropPlan, Qwen2Config, Qwen2LM, RopeTable, rope_cos_sin

CONFIG = Qwen2Config(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
)
ATOL = 1e-5
PLANS: list[DropPlan | None] = [
    None,
    DropPlan("uniform", (1, 3), (1.0, 0.5, 0.25)),
    DropPlan("attention", (2,), (1.0, 0.4)),
    DropPlan("uniform0_attention", (1, 3), (1.0, 0.75, 0.25)),
]
PLAN_IDS = ["nodrop", "uniform", "attention", "uniform0_attention"]


def tiny_lm(attention: str = "sdpa", seed: int = 0) -> Qwen2LM:
    torch.manual_seed(seed)
    lm = Qwen2LM(CONFIG, attention=attention)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
    return lm.eval()


def prompt(seed: int, header: int, visual: int, suffix: int) -> tuple[torch.Tensor, int, int]:
    """[1, header + visual + suffix, H] random rows; visual rows follow the header."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, header + visual + suffix, CONFIG.hidden_size, generator=generator)
    return embeds, header, visual


def pool_for(slots: int, plan: DropPlan | None = None, max_new: int = 16) -> KVPool:
    layers, ratios = ((), (1.0,)) if plan is None else (plan.layers, plan.ratios)
    capacity = layer_capacity(
        CONFIG.num_hidden_layers,
        max_text=32,
        max_visual=64,
        max_new=max_new,
        drop_layers=layers,
        drop_ratios=ratios,
    )
    return KVPool.for_model(
        CONFIG, slots=slots, layer_capacity=capacity, device="cpu", dtype=torch.float32
    )


# --- KV pool -------------------------------------------------------------------------------


def test_pool_hands_out_lowest_free_slot_and_is_bounded() -> None:
    pool = pool_for(2)
    a, b = pool.acquire(), pool.acquire()
    assert (a.slot, b.slot) == (0, 1) and pool.free_slots == 0
    with pytest.raises(KVPoolExhausted):
        pool.acquire()
    pool.release(a)
    with pytest.raises(ValueError):
        pool.release(a)  # twice
    assert pool.acquire().slot == 0
    assert pool.nbytes == 2 * 2 * 2 * 16 * sum(pool.capacity) * 4  # K+V, slots, heads, dim, f32


def test_layer_capacity_follows_the_drop_ratios() -> None:
    caps = layer_capacity(
        5, max_text=10, max_visual=100, max_new=5, drop_layers=(1, 3), drop_ratios=(1.0, 0.5, 0.25)
    )
    assert caps == (115, 65, 65, 40, 40)


def test_pooled_prefill_and_decode_equal_the_growable_cache() -> None:
    lm = tiny_lm()
    embeds, start, n = prompt(1, 6, 40, 9)
    plan = PLANS[3]
    plain = lm.prefill(embeds, visual_start=start, visual_len=n, drop=plan)
    pool = pool_for(3, plan)
    pool.acquire()  # slot 0 busy: the sequence lives in slot 1
    cache = pool.acquire()
    pooled = lm.prefill(embeds, visual_start=start, visual_len=n, drop=plan, cache=cache)
    torch.testing.assert_close(pooled.logits, plain.logits, atol=ATOL, rtol=0)
    assert cache.lengths() == plain.cache.lengths()
    for token in (3, 50, 7):
        ref = lm.decode(token, plain.cache)
        got = lm.decode_batch(torch.tensor([token]), [cache])[0]
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert cache.lengths() == plain.cache.lengths()


def test_a_full_slot_raises_before_writing() -> None:
    lm = tiny_lm()
    embeds, start, n = prompt(2, 4, 20, 4)
    pool = pool_for(1, None, max_new=1)
    cache = pool.acquire()
    lm.prefill(embeds, visual_start=start, visual_len=n, drop=None, cache=cache)
    capacity = pool.capacity[0]
    while cache.layers[0].length < capacity:
        lm.decode_batch(torch.tensor([1]), [cache])
    before = cache.lengths()
    with pytest.raises(KVCapacityError):
        lm.decode_batch(torch.tensor([1]), [cache])
    assert cache.lengths() == before


# --- batched decode ---------------------------------------------------------------------------

SEQUENCES = [  # (seed, header, visual, suffix, plan index): ragged lengths, mixed drop plans
    (10, 6, 40, 9, 0),
    (11, 3, 64, 5, 3),
    (12, 8, 24, 12, 1),
    (13, 5, 50, 3, 2),
    (14, 2, 12, 20, 3),
]


def _sessions(lm: Qwen2LM, pool: KVPool | None, max_new: int) -> list[GenerationSession]:
    out = []
    for seed, header, visual, suffix, plan_index in SEQUENCES:
        embeds, start, n = prompt(seed, header, visual, suffix)
        out.append(
            GenerationSession(
                lm,
                embeds,
                visual_start=start,
                visual_len=n,
                drop=PLANS[plan_index],
                sampling=SamplingParams(max_new_tokens=max_new),
                stop_ids=frozenset(),
                cache=None if pool is None else pool.acquire(),
            )
        )
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_greedy_equals_one_at_a_time(attention: str) -> None:
    lm = tiny_lm(attention)
    max_new = 10
    alone = _sessions(lm, None, max_new)
    for session in alone:
        session.prefill()
        while session.step() is not None:
            pass
    pool = pool_for(8, None, max_new=max_new)
    pool.acquire()  # a busy slot below the batch: rows of the range outside the batch
    together = _sessions(lm, pool, max_new)
    for session in together:
        session.prefill()
    steps = 0
    while live := [s for s in together if not s.done]:
        if steps % 3 == 1:
            live = live[::-1]  # the order within a batch does not matter
        decode_batch(lm, live)
        steps += 1
    assert steps == max_new - 1
    for a, b in zip(alone, together, strict=True):
        assert a.new_tokens == b.new_tokens
        assert len(b.new_tokens) == max_new


def test_batched_logits_equal_single_logits_with_ragged_batches() -> None:
    """Sequences join and leave the batch: every step's logits equal each one decoded alone."""
    lm = tiny_lm()
    pool = pool_for(6)
    caches, refs = [], []
    for seed, header, visual, suffix, plan_index in SEQUENCES[:4]:
        embeds, start, n = prompt(seed, header, visual, suffix)
        plan = PLANS[plan_index]
        refs.append(lm.prefill(embeds, visual_start=start, visual_len=n, drop=plan).cache)
        caches.append(pool.acquire())
        lm.prefill(embeds, visual_start=start, visual_len=n, drop=plan, cache=caches[-1])
    schedule = [[0, 1, 2, 3], [0, 2], [1, 2, 3], [3], [0, 1, 2, 3]]
    for step, members in enumerate(schedule):
        tokens = [(7 * step + 3 * m) % CONFIG.vocab_size for m in members]
        got = lm.decode_batch(torch.tensor(tokens), [caches[m] for m in members])
        for row, (m, token) in enumerate(zip(members, tokens, strict=True)):
            torch.testing.assert_close(got[row], lm.decode(token, refs[m]), atol=ATOL, rtol=0)
            assert caches[m].lengths() == refs[m].lengths()


def test_batched_sampling_follows_each_sessions_seed() -> None:
    lm = tiny_lm()
    embeds, start, n = prompt(3, 4, 16, 4)
    params = [SamplingParams(max_new_tokens=6, temperature=2.0, seed=s) for s in (1, 2)]
    alone = [
        generate(
            lm,
            embeds,
            visual_start=start,
            visual_len=n,
            drop=None,
            sampling=p,
            stop_ids=frozenset(),
        )
        for p in params
    ]
    pool = pool_for(2)
    sessions = [
        GenerationSession(
            lm,
            embeds,
            visual_start=start,
            visual_len=n,
            drop=None,
            sampling=p,
            stop_ids=frozenset(),
            cache=pool.acquire(),
        )
        for p in params
    ]
    for s in sessions:
        s.prefill()
    while live := [s for s in sessions if not s.done]:
        decode_batch(lm, live)
    assert [s.new_tokens for s in sessions] == alone


def test_decode_batch_refuses_mixed_caches() -> None:
    lm = tiny_lm()
    embeds, start, n = prompt(4, 2, 8, 2)
    growable = lm.prefill(embeds, visual_start=start, visual_len=n, drop=None).cache
    with pytest.raises(ValueError, match="KVPool"):
        lm.decode_batch(torch.tensor([1]), [growable])
    pool = pool_for(2)
    cache = pool.acquire()
    lm.prefill(embeds, visual_start=start, visual_len=n, drop=None, cache=cache)
    with pytest.raises(ValueError, match="twice"):
        lm.decode_batch(torch.tensor([1, 2]), [cache, cache])


# --- chunked prefill ---------------------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_chunked_prefill_equals_one_shot(plan: DropPlan | None, chunk: int) -> None:
    lm = tiny_lm()
    embeds, start, n = prompt(5, 6, 40, 9)
    whole = lm.prefill(embeds, visual_start=start, visual_len=n, drop=plan, all_logits=True)
    job = PrefillJob(
        lm, embeds, visual_start=start, visual_len=n, drop=plan, chunk_tokens=chunk, all_logits=True
    )
    steps = 0
    while True:
        rows, layers = job.next_step_cost
        assert (rows, layers) == (0, 0) or (1 <= rows <= chunk and layers >= 1)
        if job.step():
            break
        steps += 1
        assert job.output is None
    assert job.next_step_cost == (0, 0)
    out = job.output
    assert out is not None
    torch.testing.assert_close(out.logits, whole.logits, atol=ATOL, rtol=0)
    assert out.kept_visual.tolist() == whole.kept_visual.tolist()
    assert out.cache.lengths() == whole.cache.lengths()
    assert out.cache.position_shift == whole.cache.position_shift
    if chunk == 1:
        assert steps + 1 >= embeds.shape[1]  # at least one step per row of the first segment
    for token in (5, 9):
        torch.testing.assert_close(
            lm.decode(token, out.cache), lm.decode(token, whole.cache), atol=ATOL, rtol=0
        )


def test_chunked_session_generates_the_same_answer() -> None:
    lm = tiny_lm()
    embeds, start, n = prompt(6, 5, 48, 7)
    plan = PLANS[3]
    kwargs: dict[str, Any] = dict(
        visual_start=start,
        visual_len=n,
        drop=plan,
        sampling=SamplingParams(max_new_tokens=8),
        stop_ids=frozenset(),
    )
    expected = generate(lm, embeds, **kwargs)
    session = GenerationSession(
        lm, embeds, chunk_tokens=5, cache=pool_for(1, plan).acquire(), **kwargs
    )
    steps = 0
    while not session.prefill_step():
        steps += 1
    assert steps > 3
    while session.step() is not None:
        pass
    assert session.new_tokens == expected


# --- prefix reuse --------------------------------------------------------------------------------


def test_prefix_stop_layer() -> None:
    assert prefix_stop_layer(None, 5, 10) == 5
    assert prefix_stop_layer(PLANS[1], 5, 10) == 5  # all uniform: nothing depends on the question
    assert prefix_stop_layer(PLANS[2], 5, 10) == 2
    assert prefix_stop_layer(PLANS[3], 5, 10) == 3  # uniform0_attention: the second drop
    assert prefix_stop_layer(PLANS[3], 5, 0) == 5


@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("chunk", [None, 4])
def test_prefix_resume_equals_full_prefill(plan: DropPlan | None, chunk: int | None) -> None:
    lm = tiny_lm()
    header, visual = 6, 40
    state = prefix_job(
        lm, prompt(7, header, visual, 0)[0], visual_start=header, drop=plan, chunk_tokens=chunk
    ).run_prefix()
    for seed, suffix in ((20, 9), (21, 1), (22, 15)):  # several questions on one selection
        question = torch.randn(
            1, suffix, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed)
        )
        full_embeds = torch.cat([prompt(7, header, visual, 0)[0], question], dim=1)
        full = lm.prefill(
            full_embeds, visual_start=header, visual_len=visual, drop=plan, all_logits=True
        )
        job = PrefillJob.resume(lm, state, question, chunk_tokens=chunk, all_logits=True)
        out = job.run()
        torch.testing.assert_close(out.logits, full.logits, atol=ATOL, rtol=0)
        assert out.kept_visual.tolist() == full.kept_visual.tolist()
        assert [k.tolist() for k in out.kept_per_stage] == [k.tolist() for k in full.kept_per_stage]
        assert out.cache.lengths() == full.cache.lengths()
        assert out.cache.position_shift == full.cache.position_shift
        assert out.cache.next_position == full.cache.next_position
        torch.testing.assert_close(
            lm.decode(3, out.cache), lm.decode(3, full.cache), atol=ATOL, rtol=0
        )
    assert state.kv[0][0].shape[2] == header + visual  # the state was not changed by resuming


def test_prefix_resume_session_into_a_pool_generates_the_same_answer() -> None:
    lm = tiny_lm()
    plan = PLANS[3]
    embeds, start, n = prompt(8, 6, 40, 9)
    kwargs: dict[str, Any] = dict(
        visual_start=start,
        visual_len=n,
        drop=plan,
        sampling=SamplingParams(max_new_tokens=8),
        stop_ids=frozenset(),
    )
    expected = generate(lm, embeds, **kwargs)
    state = prefix_job(lm, embeds[:, : start + n], visual_start=start, drop=plan).run_prefix()
    session = GenerationSession(
        lm, embeds[:, start + n :], prefix=state, cache=pool_for(1, plan).acquire(), **kwargs
    )
    session.prefill()
    while session.step() is not None:
        pass
    assert session.new_tokens == expected
    with pytest.raises(ValueError, match="match"):
        GenerationSession(lm, embeds[:, start + n :], prefix=state, **{**kwargs, "drop": None})


def test_prefix_cache_is_a_byte_bounded_lru() -> None:
    lm = tiny_lm()
    states = [
        prefix_job(lm, prompt(30 + i, 4, 16, 0)[0], visual_start=4, drop=PLANS[3]).run_prefix()
        for i in range(3)
    ]
    size = states[0].nbytes
    assert all(s.nbytes == size for s in states)
    cache = PrefixCache(max_bytes=2 * size)
    assert cache.put("a", states[0]) and cache.put("b", states[1])
    assert cache.get("a") is states[0]  # "a" is now the most recent
    assert cache.put("c", states[2])  # evicts "b", the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 2 * size and len(cache) == 2
    assert cache.get("b") is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 1, 1)
    assert not PrefixCache(max_bytes=size - 1).put("x", states[0])
    cache.put("a", states[1])  # refreshing a key replaces it without double counting
    assert cache.nbytes == 2 * size


def test_prefill_needs_an_empty_cache() -> None:
    lm = tiny_lm()
    embeds, start, n = prompt(9, 2, 8, 2)
    cache = KVCache(CONFIG.num_hidden_layers)
    lm.prefill(embeds, visual_start=start, visual_len=n, drop=None, cache=cache)
    with pytest.raises(ValueError, match="empty"):
        lm.prefill(embeds, visual_start=start, visual_len=n, drop=None, cache=cache)


def test_rope_table_rows_equal_direct_computation_and_grow() -> None:
    table = RopeTable(16, 1_000_000.0)
    cos, sin = table.span(0, 10, torch.device("cpu"), torch.float32)
    ref_cos, ref_sin = rope_cos_sin(torch.arange(10), 16, 1_000_000.0, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    far = torch.tensor([3, ROPE_MIN_ROWS + 5, 2 * ROPE_MIN_ROWS + 1])  # past the first size
    cos, sin = table.gather(far, int(far.max()), torch.float32)
    ref_cos, ref_sin = rope_cos_sin(far, 16, 1_000_000.0, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
def test_a_full_prefill_captures_the_same_prefix_state(plan: DropPlan | None) -> None:
    lm = tiny_lm()
    header, visual = 6, 40
    embeds, start, n = prompt(23, header, visual, 9)
    job = PrefillJob(
        lm, embeds, visual_start=start, visual_len=n, drop=plan, capture_prefix=True, chunk_tokens=8
    )
    full = job.run()
    captured = job.prefix_state()
    computed = prefix_job(lm, embeds[:, : start + n], visual_start=start, drop=plan).run_prefix()
    assert captured.stop_layer == computed.stop_layer
    assert captured.nbytes == computed.nbytes
    torch.testing.assert_close(captured.hidden, computed.hidden, atol=ATOL, rtol=0)
    for (k1, v1), (k2, v2) in zip(captured.kv, computed.kv, strict=True):
        torch.testing.assert_close(k1, k2, atol=ATOL, rtol=0)
        torch.testing.assert_close(v1, v2, atol=ATOL, rtol=0)
    assert captured.position_shift == computed.position_shift
    assert captured.kept.tolist() == computed.kept.tolist()
    other = torch.randn(1, 5, CONFIG.hidden_size, generator=torch.Generator().manual_seed(99))
    resumed = PrefillJob.resume(lm, captured, other).run()
    reference = lm.prefill(
        torch.cat([embeds[:, : start + n], other], dim=1),
        visual_start=start,
        visual_len=n,
        drop=plan,
    )
    torch.testing.assert_close(resumed.logits, reference.logits, atol=ATOL, rtol=0)
    assert full.cache.lengths()[0] == embeds.shape[1]  # the capture left the cache intact


def test_a_session_captures_its_prefix() -> None:
    lm = tiny_lm()
    plan = PLANS[3]
    embeds, start, n = prompt(24, 4, 32, 6)
    session = GenerationSession(
        lm, embeds, visual_start=start, visual_len=n, drop=plan,
        sampling=SamplingParams(max_new_tokens=2), stop_ids=frozenset(), capture_prefix=True,
    )  # fmt: skip
    assert session.captured_prefix is None
    session.prefill()
    state = session.captured_prefix
    assert state is not None and state.stop_layer == 3 and state.hidden.shape[1] == 4 + 24
