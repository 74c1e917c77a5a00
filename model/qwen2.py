"""The VideoChat-Flash LLM: a Qwen2 decoder with video-level visual token dropping.

Reads top to bottom: config and dropping plan, the pure dropping-selection functions, RoPE,
the KV cache, the blocks (RMSNorm, attention, MLP, decoder layer), then the whole model.
Numerics follow the official remote code (spec §4, §5): RMSNorm in float32, rotate-half RoPE
with ``rope_theta`` (``rope_scaling`` ignored, as the official code does), q/k/v with bias and
o_proj without, GQA, SiLU-gated MLP, separate ``lm_head``. Batch size 1, as in the official code.

Video-level dropping (§5): right after the layers named in ``DropPlan.layers`` the visual
tokens are cut to ⌊N·ratio[s+1]⌋, by uniform stride or by the attention of the last prompt
token scored with the *next* layer's norm/q/k; the sequence is spliced
[text before, kept visual, text after] and positions are renumbered 0…L′−1. Each layer's KV
cache then holds its own length, and decode positions are lowered per layer by the number of
visual tokens dropped before that layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionFn, get_backend, repeat_kv
from model.errors import UnsupportedConfigError

DropKind = Literal["uniform", "attention", "uniform0_attention"]
KV_GROW_TOKENS = 256  # cache buffers grow by at least this many tokens (amortised appends)


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfigError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError("num_attention_heads must be a multiple of KV heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class DropPlan:
    """Video-level token dropping, official semantics (§5).

    ``layers``: drop after this many decoder layers (official ``llm_compress_layer_list``).
    ``ratios``: kept fraction of the original N visual tokens per stage, len(layers) + 1,
    ratios[0] == 1.0 (official ``llm_image_token_ratio_list``).
    """

    kind: DropKind
    layers: tuple[int, ...]
    ratios: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.ratios) != len(self.layers) + 1 or self.ratios[0] != 1.0:
            raise UnsupportedConfigError(
                f"drop ratios {self.ratios} need len(layers)+1 entries starting with 1.0"
            )
        in_range = all(0.0 < r <= 1.0 for r in self.ratios)
        if not in_range or list(self.ratios) != sorted(self.ratios, reverse=True):
            raise UnsupportedConfigError(f"drop ratios {self.ratios} must be in (0, 1], not rising")
        if list(self.layers) != sorted(set(self.layers)) or min(self.layers, default=1) < 1:
            raise UnsupportedConfigError(f"drop layers {self.layers} must increase and be >= 1")

    def stage_kind(self, stage: int) -> Literal["uniform", "attention"]:
        """Selection used at stage ``stage`` (0-based)."""
        if self.kind == "uniform" or (self.kind == "uniform0_attention" and stage == 0):
            return "uniform"
        return "attention"


# --- dropping selection: small pure functions -------------------------------------------


def stage_keep_count(n_visual: int, ratio: float) -> int:
    """Visual tokens left after a stage: ⌊N·ratio⌋ of the ORIGINAL count N (as official)."""
    return math.floor(n_visual * ratio)


def uniform_keep(current: int, keep: int) -> torch.Tensor:
    """[keep] int64 indices into the ``current`` visual tokens: linspace truncated (§5, §10.8)."""
    return torch.linspace(0, current - 1, keep, dtype=torch.float32).long()


def topk_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """[cur] float32 scores -> [keep] int64 indices of the top-k, re-sorted ascending."""
    return torch.topk(scores, keep).indices.sort().values


def last_query_attention(q_last: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention of one query over all keys, averaged over heads.

    q_last [Hq, D] (after RoPE), k [Hkv, L, D] (after RoPE) -> [L] float32 probabilities.
    The query is the last token, so its causal-mask row is all zeros and is left out.
    """
    k = repeat_kv(k[None], q_last.shape[0] // k.shape[0])[0]  # [Hq, L, D]
    scores = torch.matmul(q_last[:, None, :], k.transpose(1, 2)) / math.sqrt(q_last.shape[-1])
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # [Hq, 1, L]
    return probs.mean(dim=0)[0]


def splice_visual(
    x: torch.Tensor, visual_start: int, visual_len: int, kept: torch.Tensor
) -> torch.Tensor:
    """[1, L, H] -> [1, L − visual_len + K, H]: [text before, kept visual rows, text after]."""
    visual = x[:, visual_start : visual_start + visual_len][:, kept.to(x.device)]
    return torch.cat([x[:, :visual_start], visual, x[:, visual_start + visual_len :]], dim=1)


# --- rotary position embedding -----------------------------------------------------------


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [L] int -> cos, sin [L, D], computed in float32 then cast (as HF Qwen2)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))  # [D/2]
    freqs = torch.outer(positions.float(), inv_freq)  # [L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [L, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D], cos/sin [L, D] -> [B, H, L, D]."""
    return x * cos + rotate_half(x) * sin


# --- KV cache ------------------------------------------------------------------------------


class LayerKV:
    """Keys (after RoPE) and values of one layer, [1, Hkv, n, D], in a buffer grown in chunks."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add [1, Hkv, n, D] keys/values; return views of all cached ones [1, Hkv, length, D]."""
        end = self.length + k.shape[2]
        if self._k is None or self._v is None or end > self._k.shape[2]:
            capacity = end + max(KV_GROW_TOKENS, end // 8)
            self._k, self._v = self._grown(self._k, k, capacity), self._grown(self._v, v, capacity)
        self._k[:, :, self.length : end] = k
        self._v[:, :, self.length : end] = v
        self.length = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def _grown(self, old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        b, h, _, d = like.shape
        new = like.new_empty(b, h, capacity, d)
        if old is not None:
            new[:, :, : self.length] = old[:, :, : self.length]
        return new


class KVCache:
    """Per-layer caches whose lengths differ once tokens were dropped.

    ``position_shift[ℓ]``: visual tokens dropped before layer ℓ. ``next_position``: position of
    the next token in the UNcompressed sequence (what HF derives from the full attention mask);
    layer ℓ sees it at ``next_position − position_shift[ℓ]``, contiguous with its own cache.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.position_shift = [0] * num_layers
        self.next_position = 0

    def position(self, layer: int) -> int:
        return self.next_position - self.position_shift[layer]


# --- blocks --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # statistics in float32, as HF Qwen2RMSNorm
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen2Config, attend: AttentionFn) -> None:
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.attend = attend

    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.view(1, x.shape[1], n_heads, self.head_dim).transpose(1, 2)  # [1, h, L, D]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV
    ) -> torch.Tensor:
        """x [1, Lq, H] (normed), cos/sin [Lq, D] -> [1, Lq, H]; appends to ``kv``."""
        q = apply_rope(self._heads(self.q_proj(x), self.n_heads), cos, sin)  # [1, Hq, Lq, D]
        k = apply_rope(self._heads(self.k_proj(x), self.n_kv), cos, sin)  # [1, Hkv, Lq, D]
        v = self._heads(self.v_proj(x), self.n_kv)
        k_all, v_all = kv.append(k, v)  # [1, Hkv, Lk, D]
        out = self.attend(q, k_all, v_all)  # [1, Hq, Lq, D]
        return self.o_proj(out.transpose(1, 2).reshape(1, x.shape[1], -1))

    def last_query_scores(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """x [1, L, H] (normed) -> [L] float32: head-mean attention of the last token on all."""
        q = apply_rope(self._heads(self.q_proj(x[:, -1:]), self.n_heads), cos[-1:], sin[-1:])
        k = apply_rope(self._heads(self.k_proj(x), self.n_kv), cos, sin)
        return last_query_attention(q[0, :, 0], k[0])


class Qwen2MLP(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, attend: AttentionFn) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, attend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))

    def visual_scores(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Dropping score (§5): this layer's norm and q/k on the previous layer's output x
        [1, L, H] -> [L] float32 attention of the last token."""
        return self.self_attn.last_query_scores(self.input_layernorm(x), cos, sin)


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillOutput:
    logits: torch.Tensor  # [1, L', V] if all_logits else [1, 1, V] (last position only)
    cache: KVCache  # per-layer lengths may differ; carries the per-layer position shift
    kept_per_stage: tuple[torch.Tensor, ...]  # stage s: indices over tokens left after s−1
    kept_visual: torch.Tensor  # [K] final kept indices into the ORIGINAL visual tokens
    visual_attention: torch.Tensor | None  # [K] float32 last-token attention on kept tokens,
    # from the last attention-scored stage (None when no stage scored by attention)


class Qwen2LM(nn.Module):
    """Submodule names are the official checkpoint keys minus the leading ``model.``."""

    def __init__(self, config: Qwen2Config, attention: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention = get_backend(attention).name
        attend = get_backend(attention).fn
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config, attend) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[L] int64 token ids (no −200 placeholders) -> [L, H]."""
        return self.embed_tokens(input_ids)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.lm_head.weight.dtype)

    def decoder_layers(self) -> list[Qwen2DecoderLayer]:
        return [cast(Qwen2DecoderLayer, layer) for layer in self.layers]

    def _check_drop(self, drop: DropPlan) -> None:
        if drop.layers and drop.layers[-1] >= self.config.num_hidden_layers:
            raise UnsupportedConfigError(
                f"drop layers {drop.layers} must be below the LLM's "
                f"{self.config.num_hidden_layers} layers: layer ℓ's norm/q/k score the drop at ℓ"
            )

    @torch.no_grad()
    def prefill(
        self,
        inputs_embeds: torch.Tensor,
        *,
        visual_start: int,
        visual_len: int,
        drop: DropPlan | None,
        all_logits: bool = False,
    ) -> PrefillOutput:
        """Run the whole prompt [1, L, H] (visual rows at visual_start … +visual_len)."""
        x = inputs_embeds.to(self.lm_head.weight.dtype)
        if x.dim() != 3 or x.shape[0] != 1:
            raise ValueError(f"inputs_embeds must be [1, L, H], got {tuple(x.shape)}")
        if visual_start < 0 or visual_len < 0 or visual_start + visual_len > x.shape[1]:
            raise ValueError(f"visual span {visual_start}+{visual_len} outside length {x.shape[1]}")
        stage_at: dict[int, int] = {}  # layer index -> dropping stage that fires before it
        if drop is not None:
            self._check_drop(drop)
            stage_at = {layer: s for s, layer in enumerate(drop.layers) if visual_len > 0}
        cache = KVCache(self.config.num_hidden_layers)
        cache.next_position = x.shape[1]  # decode positions count the uncompressed prompt
        kept = torch.arange(visual_len, device=x.device)  # into the original visual tokens
        kept_per_stage: list[torch.Tensor] = []
        mass: torch.Tensor | None = None  # [current] attention on the visual tokens left
        current = visual_len
        cos, sin = self._rope(torch.arange(x.shape[1], device=x.device))
        for i, layer in enumerate(self.decoder_layers()):
            if drop is not None and i in stage_at:
                stage = stage_at[i]
                keep = stage_keep_count(visual_len, drop.ratios[stage + 1])
                span = slice(visual_start, visual_start + current)
                if drop.stage_kind(stage) == "uniform":
                    idx = uniform_keep(current, keep).to(x.device)
                    mass = None if mass is None else mass[idx]
                else:
                    visual_mass = layer.visual_scores(x, cos, sin)[span]  # [current] float32
                    idx = topk_keep(visual_mass, keep)
                    mass = visual_mass[idx]
                x = splice_visual(x, visual_start, current, idx)  # [1, L'', H]
                kept, current = kept[idx], keep
                kept_per_stage.append(idx)
                cos, sin = self._rope(torch.arange(x.shape[1], device=x.device))  # renumbered
            cache.position_shift[i] = visual_len - current
            x = layer(x, cos, sin, cache.layers[i])  # [1, L'', H]
        h = x if all_logits else x[:, -1:]
        logits = self.lm_head(self.norm(h))  # [1, L' or 1, V]
        return PrefillOutput(logits, cache, tuple(kept_per_stage), kept, mass)

    @torch.no_grad()
    def decode(self, token_id: int, cache: KVCache) -> torch.Tensor:
        """Feed one token after a prefill; returns the logits [V] for the token after it."""
        device = self.lm_head.weight.device
        x = self.embed_tokens(torch.tensor([[token_id]], device=device))  # [1, 1, H]
        rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one RoPE per distinct shift
        for i, layer in enumerate(self.decoder_layers()):
            position = cache.position(i)
            if position not in rope:
                rope[position] = self._rope(torch.tensor([position], device=device))
            x = layer(x, *rope[position], cache.layers[i])
        cache.next_position += 1
        return self.lm_head(self.norm(x))[0, -1]
