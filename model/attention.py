"""Attention backends for the Qwen2 decoder, chosen by name from a registry.

Every backend has two entry points. ``fn`` attends one sequence::

    attend(q, k, v) -> out
    q   [B, Hq, Lq, D]   queries of the newest Lq tokens
    k,v [B, Hkv, Lk, D]  keys/values of all Lk tokens (cache included), Lk >= Lq, Hq % Hkv == 0
    out [B, Hq, Lq, D]

Attention is causal and the queries are the *last* Lq of the Lk positions (bottom-right
alignment): query i sees keys 0 … Lk − Lq + i. Prefill is Lq == Lk, a prefill chunk or a decode
step has Lq < Lk.

``decode`` runs one decode step for a batch of sequences whose caches live in a pooled buffer
(see ``model.kv.KVPool``): it writes each sequence's new key/value at its own length and
attends over its own ragged length (``DecodeBatch`` below).

GQA never copies the KV heads: SDPA is called with ``enable_gqa=True``; pooled decode and eager
lay the query heads of each KV head out as rows over that head's keys (a view) instead.

Backends:
    sdpa               torch.nn.functional.scaled_dot_product_attention (default, CPU and GPU)
    eager              explicit softmax(q·kᵀ/√d + mask)·v with a float32 softmax (the reference)
    flash_attention_2  flash_attn.flash_attn_func for prefill and flash_attn_with_kvcache for
                       pooled decode; CUDA only, needs the optional ``flash-attn`` package,
                       imported lazily. GPU-only path: untested on this CPU-only machine.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from model.errors import UnsupportedConfigError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DecodeBatch:
    """One decode step of B sequences over one layer's pooled cache.

    q [B, Hq, D] and k_new/v_new [B, Hkv, D] are the new token's (after RoPE);
    k_cache/v_cache [S, T, Hkv, D] the layer's pool buffers; slots [B] int64 the sequences'
    slots and lengths [B] int64 their cached lengths at this layer BEFORE the new token.
    ``slot_lo``/``slot_hi`` (host ints) bound the slots and ``max_length`` (host int) is
    max(lengths) + 1, so no backend has to read a device value back.
    """

    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    slot_lo: int
    slot_hi: int  # exclusive
    max_length: int


DecodeFn = Callable[[DecodeBatch], torch.Tensor]  # -> out [B, Hq, D]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv·n_rep, L, D]: each KV head serves n_rep query heads (GQA).
    Kept for callers outside the hot path; the backends below never copy KV heads."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def causal_mask(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive bottom-right causal mask [Lq, Lk]: 0 where visible, dtype-min where hidden."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = torch.zeros(q_len, k_len, dtype=dtype, device=device)
    return mask.masked_fill(k_pos > q_pos, torch.finfo(dtype).min)


def _eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Grouped eager attention: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], additive mask
    broadcastable to [B, 1, Lq, Lk] -> [B, Hq, Lq, D]. Query heads are grouped per KV head
    (a view), so the keys are never repeated."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv * lq, d)  # heads of one group side by side: a view
    scores = torch.matmul(qg, k.transpose(2, 3)) / math.sqrt(d)  # [B, Hkv, g·Lq, Lk]
    scores = scores.view(b, hq, lq, -1)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(b, hkv, hq // hkv * lq, -1), v)  # [B, Hkv, g·Lq, D]
    return out.view(b, hq, lq, d)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference backend: scores in the model dtype, softmax in float32 (as HF Qwen2 eager)."""
    mask = None
    if q.shape[2] > 1:  # a single newest query sees every key: no mask needed
        mask = causal_mask(q.shape[2], k.shape[2], q.dtype, q.device)
    return _eager(q, k, v, mask)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused kernel with native GQA. ``is_causal`` is top-left aligned, so it is
    used only when Lq == Lk; a longer key range gets an explicit bottom-right mask."""
    gqa = q.shape[1] != k.shape[1]
    q_len, k_len = q.shape[2], k.shape[2]
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = causal_mask(q_len, k_len, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def flash_attention_2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn 2 (GPU-only, untested here). Imported lazily so CPU hosts never load it.
    flash-attn ≥ 2.1 aligns the causal mask bottom-right and handles GQA natively."""
    from flash_attn import flash_attn_func  # GPU-only optional dependency

    out = flash_attn_func(  # takes and returns [B, L, H, D]
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=q.shape[2] > 1
    )
    return out.transpose(1, 2)


# --- pooled, batched decode ------------------------------------------------------------------


def _append_new(batch: DecodeBatch) -> None:
    """Write each sequence's new key/value at its own length (one scatter per tensor)."""
    batch.k_cache[batch.slots, batch.lengths] = batch.k_new
    batch.v_cache[batch.slots, batch.lengths] = batch.v_new


def _padded_decode(batch: DecodeBatch, masked: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Append, then attend over the slot range [slot_lo, slot_hi) of the pool as a view.

    Slots of the range that are not in the batch get a zero query and a length of one (a
    finite, ignored row), so the cache is read in place, never gathered.
    """
    _append_new(batch)
    rows = batch.slots - batch.slot_lo  # [B] rows of the range
    n_rows = batch.slot_hi - batch.slot_lo
    t = batch.max_length
    k = batch.k_cache[batch.slot_lo : batch.slot_hi, :t].transpose(1, 2)  # [R, Hkv, T, D] view
    v = batch.v_cache[batch.slot_lo : batch.slot_hi, :t].transpose(1, 2)
    _, hq, d = batch.q.shape
    q = batch.q.new_zeros(n_rows, hq, d).index_copy_(0, rows, batch.q)  # [R, Hq, D]
    visible = torch.ones(n_rows, dtype=torch.long, device=q.device)
    visible = visible.index_copy_(0, rows, batch.lengths + 1)  # [R] keys each row sees
    keep = torch.arange(t, device=q.device)[None, :] < visible[:, None]  # [R, T] bool
    out = masked(q[:, :, None], k, v, keep[:, None, None, :])  # [R, Hq, 1, D]
    return out[:, :, 0].index_select(0, rows)


def _sdpa_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """One query position per sequence: the g query heads of a KV head are laid out as g query
    rows over that head's keys (a view), which is exact here because they share the position
    and the mask. So no kernel needs GQA support, and a masked fused kernel applies on GPUs."""
    r, hq, _, d = q.shape
    hkv = k.shape[1]
    grouped = q.reshape(r, hkv, hq // hkv, d)  # [R, Hkv, g, D]
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=keep)  # [R, Hkv, g, D]
    return out.reshape(r, hq, 1, d)


def _eager_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    additive = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
    return _eager(q, k, v, additive.masked_fill(~keep, torch.finfo(q.dtype).min))


def sdpa_decode(batch: DecodeBatch) -> torch.Tensor:
    return _padded_decode(batch, _sdpa_masked)


def eager_decode(batch: DecodeBatch) -> torch.Tensor:
    return _padded_decode(batch, _eager_masked)


def flash_decode(batch: DecodeBatch) -> torch.Tensor:
    """flash_attn_with_kvcache (GPU-only, untested here): appends k/v at ``cache_seqlens`` in
    place and attends each sequence over its own length, reading the pool by slot index."""
    from flash_attn import flash_attn_with_kvcache  # GPU-only optional dependency

    out = flash_attn_with_kvcache(
        batch.q[:, None],  # [B, 1, Hq, D]
        batch.k_cache,
        batch.v_cache,
        k=batch.k_new[:, None],
        v=batch.v_new[:, None],
        cache_seqlens=batch.lengths.to(torch.int32),
        cache_batch_idx=batch.slots.to(torch.int32),
        causal=True,
    )
    return out[:, 0]


# --- registry ----------------------------------------------------------------------------------


def _always(device: torch.device) -> bool:
    return True


def _flash_available(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and importlib.util.find_spec("flash_attn") is not None
    )


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: AttentionFn
    decode: DecodeFn
    available: Callable[[torch.device], bool]  # can it run on this device, on this host?


BACKENDS: Mapping[str, AttentionBackend] = MappingProxyType(
    {
        "sdpa": AttentionBackend("sdpa", sdpa_attention, sdpa_decode, _always),
        "eager": AttentionBackend("eager", eager_attention, eager_decode, _always),
        "flash_attention_2": AttentionBackend(
            "flash_attention_2", flash_attention_2, flash_decode, _flash_available
        ),
    }
)


def get_backend(name: str) -> AttentionBackend:
    """The registered backend called ``name``; an unknown name raises UnsupportedConfigError."""
    try:
        return BACKENDS[name]
    except KeyError as exc:
        known = ", ".join(sorted(BACKENDS))
        raise UnsupportedConfigError(
            f"unknown attention backend {name!r}; known backends: {known}"
        ) from exc


def resolve_attention(name: str, device: torch.device | str) -> str:
    """Turn a configured name into a backend that runs on ``device``.

    "auto" picks flash_attention_2 on CUDA when flash-attn is installed, else sdpa. An explicit
    name must be registered and runnable on the device.
    """
    device = torch.device(device)
    if name == "auto":
        flash = BACKENDS["flash_attention_2"]
        return flash.name if flash.available(device) else "sdpa"
    backend = get_backend(name)
    if not backend.available(device):
        raise UnsupportedConfigError(
            f"attention backend {name!r} cannot run on {device}: it needs CUDA and flash-attn"
        )
    return backend.name
