"""Attention backends for the Qwen2 decoder, chosen by name from a registry.

Every backend has the same signature::

    attend(q, k, v) -> out
    q   [B, Hq, Lq, D]   queries of the newest Lq tokens
    k,v [B, Hkv, Lk, D]  keys/values of all Lk tokens (cache included), Lk >= Lq, Hq % Hkv == 0
    out [B, Hq, Lq, D]

Attention is causal and the queries are the *last* Lq of the Lk positions (bottom-right
alignment): query i sees keys 0 … Lk − Lq + i. Prefill is Lq == Lk, a decode step is Lq == 1.

Backends:
    sdpa               torch.nn.functional.scaled_dot_product_attention (default, CPU and GPU)
    eager              explicit softmax(q·kᵀ/√d + mask)·v with a float32 softmax (the reference)
    flash_attention_2  flash_attn.flash_attn_func; CUDA only, needs the optional ``flash-attn``
                       package. GPU-only path: untested on this CPU-only machine.
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


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv·n_rep, L, D]: each KV head serves n_rep query heads (GQA)."""
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


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference backend: scores in the model dtype, softmax in float32 (as HF Qwen2 eager)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])  # [B, Hq, Lq, Lk]
    if q.shape[2] > 1:  # a single newest query sees every key: no mask needed
        scores = scores + causal_mask(q.shape[2], k.shape[2], scores.dtype, scores.device)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused kernel. ``is_causal`` is top-left aligned, so it is used only when
    Lq == Lk; a longer key range gets an explicit bottom-right mask."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    q_len, k_len = q.shape[2], k.shape[2]
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = causal_mask(q_len, k_len, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def flash_attention_2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn 2 (GPU-only, untested here). Imported lazily so CPU hosts never load it.
    flash-attn ≥ 2.1 aligns the causal mask bottom-right and handles GQA natively."""
    from flash_attn import flash_attn_func  # GPU-only optional dependency

    out = flash_attn_func(  # takes and returns [B, L, H, D]
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=q.shape[2] > 1
    )
    return out.transpose(1, 2)


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
    available: Callable[[torch.device], bool]  # can it run on this device, on this host?


BACKENDS: Mapping[str, AttentionBackend] = MappingProxyType(
    {
        "sdpa": AttentionBackend("sdpa", sdpa_attention, _always),
        "eager": AttentionBackend("eager", eager_attention, _always),
        "flash_attention_2": AttentionBackend(
            "flash_attention_2", flash_attention_2, _flash_available
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
