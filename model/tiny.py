"""A tiny, randomly initialised VideoChat-Flash for demos and tests (no download).

Vision: width 64, 3 declared / 2 built blocks, 4 heads, image 112 (7x7 patches, 196 tokens per
clip, merged to 64). LLM: hidden 64, 3 layers, 4 heads / 2 KV heads, FFN 128. Initialised like the
golden folders' tiny model: parameters in sorted-name order from one seeded generator; matrices
and kernels N(0, 1/fan_in), token embeddings N(0, 1), norm weights 1 + 0.1·N(0, 1), other
vectors 0.1·N(0, 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import VideoChatFlashConfig
from model.qwen2 import Qwen2Config
from model.videochat_flash import VideoChatFlash
from model.vision import VisionConfig

IM_END_ID = 258  # model.prompt.byte_level_tokenizer: bytes 0-255, then 256-258 the specials
UNREADABLE_LOGIT = -1e4  # added to the logits of tokens the demo must not print

TINY_VISION = VisionConfig(
    image_size=112, patch_size=16, width=64, declared_layers=3, select_layer=-2, num_heads=4
)


def tiny_config(vocab_size: int = 512) -> VideoChatFlashConfig:
    """The tiny model's config (no dropping of its own; the loader applies the settings')."""
    llm = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
    )
    return VideoChatFlashConfig(
        vision_tower="umt-hd-large", vision=TINY_VISION, llm=llm, tokenizer_model_max_length=32768
    )


def _init_(name: str, param: torch.Tensor, generator: torch.Generator) -> None:
    values = torch.randn(param.shape, generator=generator)
    if name.endswith("embed_tokens.weight"):
        scale, shift = 1.0, 0.0
    elif param.dim() >= 2:
        scale, shift = 1.0 / math.sqrt(math.prod(param.shape[1:])), 0.0
    elif name.endswith("weight"):  # LayerNorm / RMSNorm gains
        scale, shift = 0.1, 1.0
    else:  # biases, q_bias, v_bias
        scale, shift = 0.1, 0.0
    param.copy_(values * scale + shift)


@torch.no_grad()
def build_random(
    config: VideoChatFlashConfig, seed: int = 0, attention: str = "sdpa"
) -> VideoChatFlash:
    """A model of any geometry with seeded random weights (float32, CPU); for tests/benchmarks."""
    model = VideoChatFlash(config, attention=attention)
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        _init_(name, param, generator)
    return model.eval().requires_grad_(False)


def readable_token_ids(vocab_size: int) -> list[int]:
    """Ids of the byte-level tokenizer (model.prompt) that print: newline, the printable ASCII
    bytes, and ``<|im_end|>`` so that answers can end."""
    printable = [0x0A, *range(0x20, 0x7F)]
    return [i for i in (*printable, IM_END_ID) if i < vocab_size]


@torch.no_grad()
def build_tiny(seed: int = 0, vocab_size: int = 512, attention: str = "sdpa") -> VideoChatFlash:
    """The tiny model in float32 on CPU, deterministic for a given seed.

    Its weights are random, so its answers are meaningless; a bias on the output layer keeps them
    readable: every token but ``readable_token_ids`` scores far below any readable one, under
    greedy decoding and sampling alike. (Released checkpoints have no such bias.)
    """
    model = build_random(tiny_config(vocab_size), seed, attention)
    head = model.llm.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight.copy_(head.weight)
    biased.bias.fill_(UNREADABLE_LOGIT)
    biased.bias[readable_token_ids(vocab_size)] = 0.0
    model.llm.lm_head = biased.requires_grad_(False)
    return model
