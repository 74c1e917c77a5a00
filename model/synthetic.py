"""Random-weight models of the real geometries, for benchmarks and device checks.

Imports only torch and the model's own blocks (no tokenizer, no video library), so that
``benchmarks/gpu_check.py`` runs where only torch and safetensors are installed. Weights are
drawn on the target device (fast at full size), scaled like ``model.tiny.build_random``:
matrices N(0, 1/fan_in), embeddings N(0, 1), norm gains 1 + 0.1·N(0, 1), other vectors
0.1·N(0, 1), so activations stay in range at any width and depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.hico import HiCoProjector
from model.qwen2 import DropPlan, Qwen2Config, Qwen2LM
from model.vision import UMTVisionEncoder, VisionConfig

UMT_L_448 = VisionConfig(image_size=448, width=1024, declared_layers=24, num_heads=16)


@torch.no_grad()
def random_init_(module: nn.Module, seed: int) -> None:
    """Fill every parameter of ``module`` in place, in sorted-name order, from one generator
    on the module's device."""
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in sorted(module.named_parameters()):
        values = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
        if name.endswith("embed_tokens.weight"):
            param.copy_(values)
        elif param.dim() >= 2:
            param.copy_(values / math.sqrt(math.prod(param.shape[1:])))
        elif name.endswith("weight"):
            param.copy_(values * 0.1 + 1.0)
        else:
            param.copy_(values * 0.1)


def _materialise(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    return module.to_empty(device=device).to(dtype)


def llm_2b_config(num_layers: int = 28, vocab_size: int = 151936) -> Qwen2Config:
    """The 2B checkpoint's LLM geometry (Qwen2.5-1.5B: hidden 1536, 12 / 2 heads, FFN 8960),
    with fewer layers or a smaller vocabulary where a benchmark on a CPU needs it."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=num_layers,
        num_attention_heads=12,
        num_key_value_heads=2,
    )


@torch.no_grad()
def random_llm(
    config: Qwen2Config,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
) -> Qwen2LM:
    """A Qwen2 LLM with seeded random weights drawn on ``device``."""
    with torch.device("meta"):
        lm = Qwen2LM(config, attention=attention)
    _materialise(lm, device, dtype)
    if config.tie_word_embeddings:  # to_empty gives each module its own storage
        lm.lm_head.weight = lm.embed_tokens.weight
    random_init_(lm, seed)
    return lm.eval().requires_grad_(False)


def model_card_drop(num_layers: int = 28) -> DropPlan:
    """The model card's recipe, ``uniform0_attention`` after layers [4, 18] of 28 with ratios
    [1, 0.75, 0.25], at another depth: drop points round(ℓ·layers/28), at least 1."""
    points = tuple(sorted({max(1, round(ell * num_layers / 28)) for ell in (4, 18)}))
    if len(points) < 2 or points[-1] >= num_layers:
        raise ValueError(f"{num_layers} layers are too few for the recipe's two drop points")
    return DropPlan("uniform0_attention", points, (1.0, 0.75, 0.25))


@torch.no_grad()
def random_vision(
    config: VisionConfig = UMT_L_448,
    hidden_size: int = 1536,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[UMTVisionEncoder, HiCoProjector]:
    """The UMT encoder and the HiCo projector (to ``hidden_size``) with random weights."""
    with torch.device("meta"):
        vision = UMTVisionEncoder(config)
        projector = HiCoProjector(config.width, hidden_size, config.num_heads)
    _materialise(vision, device, dtype)
    _materialise(projector, device, dtype)
    vision.reset_buffers()  # computed positional tables, not weights
    random_init_(vision, seed)
    random_init_(projector, seed + 1)
    return vision.eval().requires_grad_(False), projector.eval().requires_grad_(False)
