"""The Qwen2 LLM (with video-level dropping) against the official outputs in each golden folder.

Inputs are the golden ``inputs_embeds`` (text and visual rows already spliced), so these checks
cover only the LLM half: logits with and without dropping, kept indices, greedy generation;
then the engine's paths (chunked prefill, prefix reuse, pooled batched decode) against the same
official outputs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from model.generation import GenerationSession, SamplingParams, decode_batch, generate
from model.kv import KVPool, layer_capacity
from model.prefill import PrefillJob, prefix_job
from model.qwen2 import DropPlan, Qwen2Config, Qwen2LM

ATOL = 1e-5
DROP_KINDS = ("uniform", "attention", "uniform0_attention")
NON_LLM_PREFIXES = ("model.vision_tower.", "model.mm_projector.")


def _llm_config(config: dict[str, Any]) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=config["rope_theta"],
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )


def load_llm(golden: Any, attention: str) -> Qwen2LM:
    """The golden checkpoint's LLM: ``model.X`` -> ``X``, ``lm_head.weight`` as is."""
    config = json.loads((golden.checkpoint / "config.json").read_text())
    lm = Qwen2LM(_llm_config(config), attention=attention)
    state = load_file(str(golden.checkpoint / "model.safetensors"))
    llm_state = {
        key.removeprefix("model."): tensor
        for key, tensor in state.items()
        if not key.startswith(NON_LLM_PREFIXES)
    }
    lm.load_state_dict(llm_state, strict=True)
    return lm.eval()


def visual_span(golden: Any) -> tuple[torch.Tensor, int, int]:
    """(inputs_embeds [1, L', H], visual_start, visual_len) from the placeholder in input_ids."""
    t = golden.require("input_ids", "inputs_embeds")
    ids, embeds = t["input_ids"][0], t["inputs_embeds"]
    (start,) = (ids == -200).nonzero()[:, 0].tolist()
    return embeds, start, embeds.shape[1] - (ids.shape[0] - 1)


def drop_plan(golden: Any, kind: str) -> DropPlan:
    meta = golden.meta
    assert "llm_compress_layer_list" in meta, f"{golden.name}: golden_meta.json has no dropping"
    return DropPlan(
        kind=kind,  # type: ignore[arg-type]
        layers=tuple(meta["llm_compress_layer_list"]),
        ratios=tuple(meta["llm_image_token_ratio_list"]),
    )


@pytest.mark.golden_needs("input_ids", "inputs_embeds", "logits_nodrop")
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_logits_nodrop(golden: Any, attention: str) -> None:
    expected = golden.require("logits_nodrop")["logits_nodrop"]
    embeds, start, n_visual = visual_span(golden)
    out = load_llm(golden, attention).prefill(
        embeds, visual_start=start, visual_len=n_visual, drop=None, all_logits=True
    )
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
    assert out.kept_visual.tolist() == list(range(n_visual))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.golden_cases("logits_drop_{}", DROP_KINDS)
def test_logits_drop(golden_case: tuple[Any, str], attention: str) -> None:
    golden, kind = golden_case
    expected = golden.require(f"logits_drop_{kind}")[f"logits_drop_{kind}"]
    embeds, start, n_visual = visual_span(golden)
    plan = drop_plan(golden, kind)
    out = load_llm(golden, attention).prefill(
        embeds, visual_start=start, visual_len=n_visual, drop=plan, all_logits=True
    )
    assert out.logits.shape == expected.shape  # logits at the compacted length
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
    # final indices compose the per-stage ones
    composed = torch.arange(n_visual)
    for stage in out.kept_per_stage:
        composed = composed[stage]
    assert out.kept_visual.tolist() == composed.tolist()


@pytest.mark.golden_cases("kept_visual_idx_{}_stage0", DROP_KINDS)
def test_kept_visual_indices(golden_case: tuple[Any, str]) -> None:
    golden, kind = golden_case
    plan = drop_plan(golden, kind)
    names = [f"kept_visual_idx_{kind}_stage{s}" for s in range(len(plan.layers))]
    expected = golden.require(*names)
    embeds, start, n_visual = visual_span(golden)
    out = load_llm(golden, "sdpa").prefill(
        embeds, visual_start=start, visual_len=n_visual, drop=plan
    )
    assert len(out.kept_per_stage) == len(names)
    for name, kept in zip(names, out.kept_per_stage, strict=True):
        assert kept.tolist() == expected[name].tolist(), name


@pytest.mark.golden_cases("generated_ids_{}", ["nodrop", *(f"drop_{k}" for k in DROP_KINDS)])
def test_generated_ids(golden_case: tuple[Any, str]) -> None:
    golden, variant = golden_case
    name = f"generated_ids_{variant}"
    kind = variant.removeprefix("drop_") if variant != "nodrop" else None
    expected = golden.require(name)[name][0].tolist()
    embeds, start, n_visual = visual_span(golden)
    plan = None if kind is None else drop_plan(golden, kind)
    tokens = generate(
        load_llm(golden, "sdpa"),
        embeds,
        visual_start=start,
        visual_len=n_visual,
        drop=plan,
        sampling=SamplingParams(max_new_tokens=len(expected)),
        stop_ids=frozenset(),
    )
    assert tokens == expected


# --- engine paths: chunked prefill, prefix reuse, pooled batched decode ----------------------

GENERATED = [
    ("generated_ids_nodrop", None),
    ("generated_ids_drop_uniform0_attention", "uniform0_attention"),
]


def _plan(golden: Any, kind: str | None) -> DropPlan | None:
    return None if kind is None else drop_plan(golden, kind)


def _pool(lm: Qwen2LM, slots: int, max_new: int) -> KVPool:
    n_layers = lm.config.num_hidden_layers
    capacity = layer_capacity(n_layers, max_text=64, max_visual=256, max_new=max_new)
    return KVPool.for_model(
        lm.config, slots=slots, layer_capacity=capacity, device="cpu", dtype=torch.float32
    )


@pytest.mark.parametrize("kind", DROP_KINDS)
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_logits(golden: Any, kind: str, chunk: int) -> None:
    expected = golden.require(f"logits_drop_{kind}")[f"logits_drop_{kind}"]
    embeds, start, n_visual = visual_span(golden)
    job = PrefillJob(
        load_llm(golden, "sdpa"),
        embeds,
        visual_start=start,
        visual_len=n_visual,
        drop=drop_plan(golden, kind),
        chunk_tokens=chunk,
        all_logits=True,
    )
    torch.testing.assert_close(job.run().logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", [None, *DROP_KINDS])
def test_prefix_reuse_logits(golden: Any, kind: str | None) -> None:
    name = "logits_nodrop" if kind is None else f"logits_drop_{kind}"
    expected = golden.require(name)[name]
    embeds, start, n_visual = visual_span(golden)
    lm = load_llm(golden, "sdpa")
    plan = _plan(golden, kind)
    end = start + n_visual
    state = prefix_job(lm, embeds[:, :end], visual_start=start, drop=plan).run_prefix()
    capturing = PrefillJob(
        lm, embeds, visual_start=start, visual_len=n_visual, drop=plan, capture_prefix=True
    )
    capturing.run()
    captured = capturing.prefix_state()  # the same state, from a question's own prefill
    for prefix in (state, state, captured):  # the state is not consumed by a resume
        out = PrefillJob.resume(lm, prefix, embeds[:, end:], all_logits=True).run()
        torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("name", "kind"), GENERATED)
def test_generation_through_every_path(golden: Any, name: str, kind: str | None) -> None:
    """The golden greedy ids from: pooled + chunked, pooled + prefix reuse, and a batch of
    several sequences decoded together (the golden one among shorter prompts)."""
    expected = golden.require(name)[name][0].tolist()
    embeds, start, n_visual = visual_span(golden)
    lm = load_llm(golden, "sdpa")
    plan = _plan(golden, kind)
    max_new = len(expected)
    pool = _pool(lm, slots=4, max_new=max_new)
    end = start + n_visual
    state = prefix_job(lm, embeds[:, :end], visual_start=start, drop=plan).run_prefix()

    def session(rows: torch.Tensor, **extra: Any) -> GenerationSession:
        return GenerationSession(
            lm,
            rows,
            visual_start=start,
            visual_len=n_visual,
            drop=plan,
            sampling=SamplingParams(max_new_tokens=max_new),
            stop_ids=frozenset(),
            cache=pool.acquire(),
            **extra,
        )

    chunked = session(embeds, chunk_tokens=3)
    reused = session(embeds[:, end:], prefix=state)
    shorter = session(embeds[:, : end + 4])  # a different, shorter question: batch filler
    sessions = [chunked, reused, shorter]
    for s in sessions:
        s.prefill()
    while live := [s for s in sessions if not s.done]:
        decode_batch(lm, live)
    assert chunked.new_tokens == expected
    assert reused.new_tokens == expected
    alone = GenerationSession(
        lm,
        embeds[:, : end + 4],
        visual_start=start,
        visual_len=n_visual,
        drop=plan,
        sampling=SamplingParams(max_new_tokens=max_new),
        stop_ids=frozenset(),
    )
    alone.prefill()
    while alone.step() is not None:
        pass
    assert shorter.new_tokens == alone.new_tokens
