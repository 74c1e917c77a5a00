"""The Qwen2 LLM on random tiny models: backends, KV cache, position shift, sampling, stops."""

from __future__ import annotations

import pytest
import torch

from model.attention import (
    BACKENDS,
    eager_attention,
    get_backend,
    resolve_attention,
    sdpa_attention,
)
from model.errors import PromptTooLongError, UnsupportedConfigError
from model.generation import (
    GenerationSession,
    SamplingParams,
    generate,
    next_token,
    top_p_filter,
)
from model.prompt import check_context
from model.qwen2 import (
    DropPlan,
    LayerKV,
    PrefillOutput,
    Qwen2Config,
    Qwen2LM,
    uniform_keep,
)

CONFIG = Qwen2Config(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)
VISUAL_START, VISUAL_LEN, PROMPT_LEN = 5, 40, 60
ATOL = 1e-5


def tiny_lm(attention: str = "sdpa", seed: int = 0) -> Qwen2LM:
    torch.manual_seed(seed)
    lm = Qwen2LM(CONFIG, attention=attention)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn_like(p))
    return lm.eval()


def same_weights(lm: Qwen2LM, attention: str) -> Qwen2LM:
    other = Qwen2LM(CONFIG, attention=attention)
    other.load_state_dict(lm.state_dict())
    return other.eval()


def prompt_embeds(seed: int = 1, length: int = PROMPT_LEN) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, CONFIG.hidden_size, generator=generator)


def run(
    lm: Qwen2LM, embeds: torch.Tensor, drop: DropPlan | None, all_logits: bool = True
) -> PrefillOutput:
    return lm.prefill(
        embeds, visual_start=VISUAL_START, visual_len=VISUAL_LEN, drop=drop, all_logits=all_logits
    )


PLANS = [
    None,
    DropPlan("uniform", (1, 3), (1.0, 0.5, 0.25)),
    DropPlan("attention", (1, 3), (1.0, 0.5, 0.25)),
    DropPlan("uniform0_attention", (2,), (1.0, 0.3)),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "nodrop" if p is None else p.kind)
def test_eager_and_sdpa_agree(plan: DropPlan | None) -> None:
    sdpa = tiny_lm("sdpa")
    eager = same_weights(sdpa, "eager")
    embeds = prompt_embeds()
    a, b = run(sdpa, embeds, plan), run(eager, embeds, plan)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    assert a.kept_visual.tolist() == b.kept_visual.tolist()
    expected_kept = VISUAL_LEN if plan is None else int(VISUAL_LEN * plan.ratios[-1])
    assert a.logits.shape[1] == PROMPT_LEN - VISUAL_LEN + expected_kept


def test_backends_agree_on_partial_causal_mask() -> None:
    """Lq < Lk (queries are the newest tokens): eager and sdpa use the bottom-right mask."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 3, 16, generator=generator)
    k, v = torch.randn(2, 1, 2, 7, 16, generator=generator)
    out = sdpa_attention(q, k, v)
    torch.testing.assert_close(out, eager_attention(q, k, v), atol=ATOL, rtol=0)
    # the first query sees keys 0..4 only: recompute it alone as a 1-query step over 5 keys
    first = eager_attention(q[:, :, :1], k[:, :, :5], v[:, :, :5])
    torch.testing.assert_close(out[:, :, :1], first, atol=ATOL, rtol=0)


def test_kv_cache_decode_equals_full_recompute() -> None:
    lm = tiny_lm()
    embeds = prompt_embeds()
    out = run(lm, embeds, None, all_logits=False)
    new_tokens = [7, 42, 3, 96]
    decoded = [lm.decode(t, out.cache) for t in new_tokens]
    full = torch.cat([embeds, lm.embed(torch.tensor(new_tokens))[None]], dim=1)
    reference = run(lm, full, None).logits[0]  # [L + 4, V]
    torch.testing.assert_close(out.logits[0, -1], reference[PROMPT_LEN - 1], atol=ATOL, rtol=0)
    for i, logits in enumerate(decoded):
        torch.testing.assert_close(logits, reference[PROMPT_LEN + i], atol=ATOL, rtol=0)


def test_decode_position_shift_after_dropping() -> None:
    """With uniform dropping the selection ignores the query, so prefill over [prompt, t]
    compacts the prompt exactly as the cached run did; t then sits at position
    L_ℓ − 1 = L − dropped_before_ℓ at each layer ℓ, which decode must reproduce."""
    lm = tiny_lm()
    plan = DropPlan("uniform", (1, 3), (1.0, 0.5, 0.25))
    embeds = prompt_embeds()
    out = run(lm, embeds, plan, all_logits=False)
    assert out.cache.position_shift == [0, 20, 20, 30]
    tokens = [11, 5]
    decoded = [lm.decode(t, out.cache) for t in tokens]
    for layer, kv in enumerate(out.cache.layers):  # each layer's positions follow its own cache
        assert kv.length == out.cache.position(layer)
    full = torch.cat([embeds, lm.embed(torch.tensor(tokens))[None]], dim=1)
    reference = run(lm, full, plan).logits[0]
    torch.testing.assert_close(decoded[0], reference[-2], atol=ATOL, rtol=0)
    torch.testing.assert_close(decoded[1], reference[-1], atol=ATOL, rtol=0)


def test_layer_kv_grows_past_its_buffer() -> None:
    kv = LayerKV()
    chunks = [torch.randn(1, 2, n, 8) for n in (300, 1, 1, 200, 1)]
    for chunk in chunks:
        k, v = kv.append(chunk, -chunk)
    torch.testing.assert_close(k, torch.cat(chunks, dim=2))
    torch.testing.assert_close(v, -torch.cat(chunks, dim=2))
    assert kv.length == 503


def test_kept_visual_and_evidence() -> None:
    lm = tiny_lm()
    out = run(lm, prompt_embeds(), DropPlan("uniform0_attention", (1, 3), (1.0, 0.5, 0.25)))
    assert out.kept_per_stage[0].tolist() == uniform_keep(VISUAL_LEN, 20).tolist()
    assert out.kept_visual.tolist() == out.kept_per_stage[0][out.kept_per_stage[1]].tolist()
    assert out.kept_visual.tolist() == sorted(out.kept_visual.tolist())
    assert out.visual_attention is not None
    assert out.visual_attention.shape == (10,)
    assert out.visual_attention.dtype == torch.float32
    assert 0.0 < float(out.visual_attention.sum()) <= 1.0 + 1e-6
    assert run(lm, prompt_embeds(), PLANS[1]).visual_attention is None  # uniform: no scores


def test_uniform_keep_truncates() -> None:
    assert uniform_keep(10, 4).tolist() == [0, 3, 6, 9]
    assert uniform_keep(128, 96).tolist() == torch.linspace(0, 127, 96).long().tolist()


def test_invalid_drop_plans_raise() -> None:
    with pytest.raises(UnsupportedConfigError):
        DropPlan("uniform", (2, 1), (1.0, 0.5, 0.25))
    with pytest.raises(UnsupportedConfigError):
        DropPlan("uniform", (1,), (0.9, 0.5))
    with pytest.raises(UnsupportedConfigError, match="not rising"):
        DropPlan("uniform", (1, 2), (1.0, 0.5, 0.75))
    with pytest.raises(UnsupportedConfigError, match="below"):
        run(tiny_lm(), prompt_embeds(), DropPlan("attention", (4,), (1.0, 0.5)))


def test_attention_registry() -> None:
    assert set(BACKENDS) == {"sdpa", "eager", "flash_attention_2"}
    with pytest.raises(UnsupportedConfigError, match="known backends"):
        get_backend("magic")
    with pytest.raises(UnsupportedConfigError):
        Qwen2LM(CONFIG, attention="magic")
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("eager", "cpu") == "eager"
    with pytest.raises(UnsupportedConfigError, match="CUDA"):
        resolve_attention("flash_attention_2", "cpu")


def _generate(
    lm: Qwen2LM, sampling: SamplingParams, stop_ids: frozenset[int] = frozenset()
) -> list[int]:
    return generate(
        lm,
        prompt_embeds(),
        visual_start=VISUAL_START,
        visual_len=VISUAL_LEN,
        drop=PLANS[3],
        sampling=sampling,
        stop_ids=stop_ids,
    )


def test_sampling_is_reproducible_with_a_seed() -> None:
    lm = tiny_lm()
    params = SamplingParams(max_new_tokens=12, temperature=5.0, seed=123)
    first = _generate(lm, params)
    assert first == _generate(lm, params)
    others = {tuple(_generate(lm, SamplingParams(12, 5.0, 1.0, seed))) for seed in range(4)}
    assert len(others) > 1  # different seeds explore different answers
    assert len(first) == 12


def test_top_p_filter_keeps_the_nucleus() -> None:
    probs = torch.tensor([0.1, 0.45, 0.05, 0.4])
    torch.testing.assert_close(top_p_filter(probs, 0.8), torch.tensor([0.0, 0.45, 0.0, 0.4]) / 0.85)
    torch.testing.assert_close(top_p_filter(probs, 0.3), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert top_p_filter(probs, 1.0) is probs
    # a tiny nucleus turns sampling into greedy decoding
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    nucleus = SamplingParams(temperature=1.0, top_p=1e-4)
    generator = torch.Generator().manual_seed(0)
    picks = {next_token(logits, nucleus, generator) for _ in range(20)}
    assert picks == {int(logits.argmax())}


def test_stop_id_ends_generation() -> None:
    lm = tiny_lm()
    greedy = _generate(lm, SamplingParams(max_new_tokens=8))
    assert len(greedy) == 8
    cut = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and i > 0)
    streamed: list[int] = []
    session = GenerationSession(
        lm,
        prompt_embeds(),
        visual_start=VISUAL_START,
        visual_len=VISUAL_LEN,
        drop=PLANS[3],
        sampling=SamplingParams(max_new_tokens=8),
        stop_ids=frozenset({greedy[cut]}),
    )
    token = session.prefill()
    while token is not None:
        streamed.append(token)
        token = session.step()
    assert streamed == session.new_tokens == greedy[:cut]
    assert session.done and session.finish_reason == "stop"
    assert session.step() is None
    assert _generate(lm, SamplingParams(max_new_tokens=8), frozenset({greedy[0]})) == []


def test_on_token_streams_every_token() -> None:
    seen: list[int] = []
    lm = tiny_lm()
    tokens = generate(
        lm,
        prompt_embeds(),
        visual_start=VISUAL_START,
        visual_len=VISUAL_LEN,
        drop=None,
        sampling=SamplingParams(max_new_tokens=5),
        stop_ids=frozenset(),
        on_token=seen.append,
    )
    assert seen == tokens and len(tokens) == 5


def test_prompt_too_long_raises() -> None:
    check_context(4096, 4096)
    with pytest.raises(PromptTooLongError, match="4097"):
        check_context(4097, 4096)


def test_invalid_sampling_params_raise() -> None:
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
