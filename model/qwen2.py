"""The VideoChat-Flash LLM: a Qwen2 decoder with video-level visual token dropping.

Reads top to bottom: config and dropping plan, the pure dropping-selection functions, RoPE,
the KV cache, the blocks (RMSNorm, attention, MLP, decoder layer), then the whole model.
Numerics follow the official remote code (spec §4, §5): RMSNorm in float32, rotate-half RoPE
with ``rope_theta`` (``rope_scaling`` ignored, as the official code does), q/k/v with bias and
o_proj without, GQA, SiLU-gated MLP, separate ``lm_head``. A prefill is one prompt (as in the
official code); decode steps can be batched across sequences held in a ``model.kv.KVPool``
(``Qwen2LM.decode_batch``). The prefill itself lives in ``model.prefill`` (one-shot, chunked,
or resumed from a cached question-independent prefix).

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

from model.attention import AttentionFn, DecodeBatch, DecodeFn, get_backend
from model.errors import UnsupportedConfigError
from model.kv import KVCache, LayerCache, LayerKV, SlotLayerKV

__all__ = ["KVCache", "LayerKV"]  # re-exported: they lived here before model.kv

DropKind = Literal["uniform", "attention", "uniform0_attention"]
ROPE_MIN_ROWS = 4096  # the RoPE table starts this long and doubles when a position passes it


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
    hq, d = q_last.shape
    hkv = k.shape[0]
    q = q_last.view(hkv, hq // hkv, d)  # query heads grouped per KV head: no KV copy
    scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(d)  # [Hkv, g, L]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).reshape(hq, -1)  # [Hq, L]
    return probs.mean(dim=0)


def splice_visual(
    x: torch.Tensor, visual_start: int, visual_len: int, kept: torch.Tensor
) -> torch.Tensor:
    """[1, L, H] -> [1, L − visual_len + K, H]: [text before, kept visual rows, text after]."""
    visual = x[:, visual_start : visual_start + visual_len][:, kept.to(x.device)]
    return torch.cat([x[:, :visual_start], visual, x[:, visual_start + visual_len :]], dim=1)


def host_ints(values: list[int] | list[list[int]], device: torch.device) -> torch.Tensor:
    """Small host-side int64 values as a device tensor without stalling the host: on CUDA
    through pinned memory and an asynchronous copy (a pageable copy would wait for all queued
    device work, one host sync per decode step)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    staged = torch.tensor(values, dtype=torch.long).pin_memory()
    return staged.to(device, non_blocking=True)


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


class RopeTable:
    """cos/sin rows for positions 0…n−1, computed once per device/dtype and doubled when a
    position passes the end; rows equal ``rope_cos_sin`` of the same positions exactly."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim, self.theta = head_dim, theta
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _ensure(
        self, rows: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos, self._sin
        if (
            cos is None
            or sin is None
            or cos.shape[0] < rows
            or cos.device != device
            or cos.dtype != dtype
        ):
            size = max(ROPE_MIN_ROWS, 1 << max(0, rows - 1).bit_length())
            positions = torch.arange(size, device=device)
            cos, sin = rope_cos_sin(positions, self.head_dim, self.theta, dtype)
            self._cos, self._sin = cos, sin
        return cos, sin

    def span(
        self, start: int, stop: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [stop − start, D] for positions start…stop−1 (views of the table)."""
        cos, sin = self._ensure(stop, device, dtype)
        return cos[start:stop], sin[start:stop]

    def gather(
        self, positions: torch.Tensor, max_position: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] int64 on the device (all <= max_position, a host int) -> [..., D]."""
        cos, sin = self._ensure(max_position + 1, positions.device, dtype)
        return cos[positions], sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D], cos/sin broadcastable ([L, D] or [B, 1, L, D]) -> [B, H, L, D]."""
    return x * cos + rotate_half(x) * sin


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


@dataclass(frozen=True)
class PooledStep:
    """Where a batched decode step reads and writes one layer's pooled cache (see
    ``attention.DecodeBatch``): buffers [S, T, Hkv, D], slots/lengths [B] int64 on the device,
    host-side slot range and max length."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    slot_lo: int
    slot_hi: int
    max_length: int


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen2Config, attend: AttentionFn, decode: DecodeFn) -> None:
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.attend, self.decode = attend, decode

    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        return x.view(b, n, n_heads, self.head_dim).transpose(1, 2)  # [B, h, L, D]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerCache
    ) -> torch.Tensor:
        """x [B, Lq, H] (normed), cos/sin [Lq, D] -> [B, Lq, H]; appends to ``kv`` (B is 1,
        or the rows of a ``model.suffix_batch.SuffixBatch``, all at the same positions)."""
        q = apply_rope(self._heads(self.q_proj(x), self.n_heads), cos, sin)  # [B, Hq, Lq, D]
        k = apply_rope(self._heads(self.k_proj(x), self.n_kv), cos, sin)  # [B, Hkv, Lq, D]
        v = self._heads(self.v_proj(x), self.n_kv)
        k_all, v_all = kv.append(k, v)  # [B, Hkv, Lk, D]
        out = self.attend(q, k_all, v_all)  # [B, Hq, Lq, D]
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def forward_pooled(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, where: PooledStep
    ) -> torch.Tensor:
        """One decode step of B pooled sequences: x [B, 1, H] (normed), cos/sin [B, 1, 1, D]
        (each sequence's own position) -> [B, 1, H]; writes the new k/v into the pool."""
        b = x.shape[0]
        q = apply_rope(self._heads(self.q_proj(x), self.n_heads), cos, sin)[:, :, 0]  # [B, Hq, D]
        k = apply_rope(self._heads(self.k_proj(x), self.n_kv), cos, sin)[:, :, 0]  # [B, Hkv, D]
        v = self._heads(self.v_proj(x), self.n_kv)[:, :, 0]
        batch = DecodeBatch(
            q, k, v, where.k_cache, where.v_cache, where.slots, where.lengths,
            where.slot_lo, where.slot_hi, where.max_length,
        )  # fmt: skip
        out = self.decode(batch)  # [B, Hq, D]
        return self.o_proj(out.reshape(b, 1, -1))

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
    def __init__(self, config: Qwen2Config, attend: AttentionFn, decode: DecodeFn) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, attend, decode)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerCache
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_pooled(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, where: PooledStep
    ) -> torch.Tensor:
        x = x + self.self_attn.forward_pooled(self.input_layernorm(x), cos, sin, where)
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
        backend = get_backend(attention)
        self.attention = backend.name
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config, backend.fn, backend.decode)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope_table = RopeTable(config.head_dim, config.rope_theta)

    def set_attention(self, name: str) -> None:
        """Switch every layer to the registered backend ``name`` (weights untouched)."""
        backend = get_backend(name)
        for layer in self.decoder_layers():
            layer.self_attn.attend, layer.self_attn.decode = backend.fn, backend.decode
        self.attention = backend.name

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[L] int64 token ids (no −200 placeholders) -> [L, H]."""
        return self.embed_tokens(input_ids)

    def rope_span(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [stop − start, D] for positions start…stop−1, from the cached table."""
        return self.rope_table.span(start, stop, self.device, self.dtype)

    def decoder_layers(self) -> list[Qwen2DecoderLayer]:
        return [cast(Qwen2DecoderLayer, layer) for layer in self.layers]

    def check_drop(self, drop: DropPlan) -> None:
        if drop.layers and drop.layers[-1] >= self.config.num_hidden_layers:
            raise UnsupportedConfigError(
                f"drop layers {drop.layers} must be below the LLM's "
                f"{self.config.num_hidden_layers} layers: layer ℓ's norm/q/k score the drop at ℓ"
            )

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., H] -> logits [..., V]."""
        return self.lm_head(self.norm(h))

    def logits_of(self, h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., H] -> the logits of ``token_ids`` [K] only, [..., K] (a
        yes/no score needs two columns, not the whole vocabulary)."""
        return F.linear(self.norm(h), self.lm_head.weight[token_ids])

    @torch.no_grad()
    def prefill(
        self,
        inputs_embeds: torch.Tensor,
        *,
        visual_start: int,
        visual_len: int,
        drop: DropPlan | None,
        all_logits: bool = False,
        cache: KVCache | None = None,
    ) -> PrefillOutput:
        """Run the whole prompt [1, L, H] (visual rows at visual_start … +visual_len) in one go,
        into ``cache`` (a fresh growable one by default). See ``model.prefill.PrefillJob`` for
        the chunked and prefix-resumed forms."""
        from model.prefill import PrefillJob  # prefill builds on this module's blocks

        job = PrefillJob(
            self,
            inputs_embeds,
            visual_start=visual_start,
            visual_len=visual_len,
            drop=drop,
            cache=cache,
            all_logits=all_logits,
        )
        return job.run()

    @torch.no_grad()
    def decode(self, token_id: int, cache: KVCache) -> torch.Tensor:
        """Feed one token after a prefill; returns the logits [V] for the token after it."""
        x = self.embed_tokens(host_ints([[token_id]], self.device))  # [1, 1, H]
        for i, layer in enumerate(self.decoder_layers()):
            position = cache.position(i)
            x = layer(x, *self.rope_span(position, position + 1), cache.layers[i])
        cache.next_position += 1
        return self.logits(x)[0, -1]

    @torch.no_grad()
    def decode_batch(self, tokens: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One decode step for B sequences of one ``KVPool``: tokens [B] int64 (on the device),
        each fed after its own cache -> logits [B, V]. Ragged lengths, per-layer lengths and
        positions come from each cache; nothing is read back from the device."""
        if not caches or tokens.shape != (len(caches),):
            raise ValueError(f"need one token per cache, got {tuple(tokens.shape)}")
        pool = caches[0].pool
        slots = [c.slot for c in caches]
        if pool is None or any(c.pool is not pool for c in caches) or None in slots:
            raise ValueError("decode_batch needs caches that hold slots of one KVPool")
        host_slots = cast(list[int], slots)
        if len(set(host_slots)) != len(host_slots):
            raise ValueError("a cache appears twice in one decode batch")
        lengths = [c.lengths() for c in caches]  # [B][layers] host ints
        rows = [cast(list[SlotLayerKV], c.layers) for c in caches]
        for row in rows:  # check every slot first: a full one raises before any write
            for layer_cache in row:
                if layer_cache.length >= layer_cache.capacity:
                    layer_cache.reserve(1)  # raises KVCapacityError
        for row in rows:
            for layer_cache in row:
                layer_cache.reserve(1)
        device = self.device
        slot_t = host_ints(host_slots, device)
        length_t = host_ints(lengths, device)  # [B, layers]
        lo, hi = min(host_slots), max(host_slots) + 1
        x = self.embed_tokens(tokens.to(device))[:, None]  # [B, 1, H]
        for i, layer in enumerate(self.decoder_layers()):
            longest = max(row[i] for row in lengths)
            pos = length_t[:, i]  # each sequence's position at this layer == its cached length
            cos, sin = self.rope_table.gather(pos, longest, self.dtype)  # [B, D]
            where = PooledStep(pool.k[i], pool.v[i], slot_t, pos, lo, hi, longest + 1)
            x = layer.forward_pooled(x, cos[:, None, None], sin[:, None, None], where)
        for cache in caches:
            cache.next_position += 1
        return self.logits(x[:, 0])  # [B, V]
