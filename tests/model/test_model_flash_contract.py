"""The flash-attn backend's calls, checked on the CPU against a stand-in that follows
flash-attn 2's documented contract (``flash_attn_func``: [B, L, H, D], GQA, bottom-right causal
mask; ``flash_attn_with_kvcache``: appends ``k``/``v`` in place at ``cache_seqlens`` of the cache
rows ``cache_batch_idx``, int32, then attends each row over its own length). The real kernels
are GPU-only; this pins our layouts, dtypes and in-place use of the pool."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from model.attention import eager_attention
from model.generation import GenerationSession, SamplingParams, decode_batch
from model.kv import KVPool, layer_capacity
from model.qwen2 import DropPlan, Qwen2Config, Qwen2LM

CONFIG = Qwen2Config(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)
PLAN = DropPlan("uniform0_attention", (1, 3), (1.0, 0.75, 0.25))


def _func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    assert q.dim() == 4 and q.stride(-1) == 1 and k.stride(-1) == 1  # [B, L, H, D]
    if not causal:
        assert q.shape[1] == 1
    out = eager_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    assert k is not None and v is not None and cache_seqlens is not None
    assert cache_batch_idx is not None
    assert cache_seqlens.dtype == torch.int32 and cache_batch_idx.dtype == torch.int32
    assert k_cache.is_contiguous() and q.shape[1] == k.shape[1] == 1
    outs = []
    for row, (slot, length) in enumerate(
        zip(cache_batch_idx.tolist(), cache_seqlens.tolist(), strict=True)
    ):
        k_cache[slot, length] = k[row, 0]
        v_cache[slot, length] = v[row, 0]
        keys = k_cache[slot : slot + 1, : length + 1]
        values = v_cache[slot : slot + 1, : length + 1]
        outs.append(_func(q[row : row + 1], keys, values, causal=causal))
    return torch.cat(outs)


@pytest.fixture
def fake_flash(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = _func  # type: ignore[attr-defined]
    module.flash_attn_with_kvcache = _with_kvcache  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", module)


def _lm(attention: str) -> Qwen2LM:
    torch.manual_seed(0)
    lm = Qwen2LM(CONFIG, attention=attention)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 1 and not name.endswith("weight"):
                p.copy_(0.1 * torch.randn_like(p))
    return lm.eval()


def test_flash_backend_matches_sdpa_on_every_path(fake_flash: None) -> None:
    sdpa = _lm("sdpa")
    flash = _lm("flash_attention_2")
    prompts = [
        torch.randn(1, n, CONFIG.hidden_size, generator=torch.Generator().manual_seed(n))
        for n in (50, 64, 41)
    ]
    capacity = layer_capacity(4, max_text=64, max_visual=0, max_new=8)

    def answers(lm: Qwen2LM, chunk: int | None) -> list[list[int]]:
        pool = KVPool.for_model(
            CONFIG, slots=4, layer_capacity=capacity, device="cpu", dtype=torch.float32
        )
        pool.acquire()  # slot 0 busy: the batch reads slots 1..3 by index
        sessions = [
            GenerationSession(
                lm,
                embeds,
                visual_start=3,
                visual_len=32,
                drop=PLAN,
                sampling=SamplingParams(max_new_tokens=6),
                stop_ids=frozenset(),
                cache=pool.acquire(),
                chunk_tokens=chunk,
            )
            for embeds in prompts
        ]
        for s in sessions:
            s.prefill()
        while live := [s for s in sessions if not s.done]:
            decode_batch(lm, live)
        return [s.new_tokens for s in sessions]

    expected = answers(sdpa, None)
    assert answers(flash, None) == expected
    assert answers(flash, 7) == expected  # chunked prefill: Lq < Lk, bottom-right causal
    full = flash.prefill(prompts[0], visual_start=3, visual_len=32, drop=PLAN, all_logits=True)
    ref = sdpa.prefill(prompts[0], visual_start=3, visual_len=32, drop=PLAN, all_logits=True)
    torch.testing.assert_close(full.logits, ref.logits, atol=1e-5, rtol=0)
