"""KV caches: a growable per-sequence cache and a preallocated, bounded pool of slots.

Dropping shortens the later layers (spec §5), so every cache keeps one length per layer and
positions follow each layer's own length: the next token sits at position ``length`` of layer ℓ.

Two kinds of per-layer storage share one interface (``LayerCache``: ``length``, ``append``,
``load``, ``view``):

- ``LayerKV``: its own buffer [1, Hkv, T, D], grown in chunks; used by the plain
  ``Qwen2LM.prefill`` / ``decode`` path and to compute prefix states.
- ``SlotLayerKV``: one slot of a ``KVPool`` layer buffer [S, T_ℓ, Hkv, D], allocated once at
  start; nothing is allocated per query or per token. ``model.batching.decode_batch`` decodes
  many pooled sequences at once over these buffers.

Usage::

    pool = KVPool.for_model(lm.config, slots=8,
                            layer_capacity=layer_capacity(cfg.num_hidden_layers, max_text=2048,
                                                          max_visual=16384, max_new=512,
                                                          drop=plan),
                            device=device, dtype=dtype)
    cache = pool.acquire()        # KVPoolExhausted when every slot is taken
    ...                           # prefill into it (model.prefill.PrefillJob), decode_batch(...)
    pool.release(cache)           # the slot is reusable at once

The pool layout [S, T, Hkv, D] is the one flash_attn_with_kvcache reads by slot index; SDPA
reads the same memory through a transposed view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from model.errors import KVCapacityError, KVPoolExhausted

if TYPE_CHECKING:
    from model.qwen2 import Qwen2Config

KV_GROW_TOKENS = 256  # growable buffers grow by at least this many tokens (amortised appends)


class LayerCache(Protocol):
    """Keys (after RoPE) and values of one layer of one sequence."""

    @property
    def length(self) -> int: ...

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add [1, Hkv, n, D]; return views of all cached rows [1, Hkv, length, D]."""
        ...

    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill an EMPTY cache with [1, Hkv, n, D] (a prefix state's rows)."""
        ...

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached rows [1, Hkv, length, D] (views)."""
        ...

    def truncate(self, length: int) -> None:
        """Forget the rows from ``length`` on (0 <= length <= self.length)."""
        ...


class LayerKV:
    """One layer's keys/values, [1, Hkv, n, D], in its own buffer grown in chunks."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if self._k is None or self._v is None or end > self._k.shape[2]:
            capacity = end + max(KV_GROW_TOKENS, end // 8)
            self._k, self._v = self._grown(self._k, k, capacity), self._grown(self._v, v, capacity)
        self._k[:, :, self.length : end] = k
        self._v[:, :, self.length : end] = v
        self.length = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.length:
            raise RuntimeError("load() needs an empty layer cache")
        self.append(k, v)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k is None or self._v is None:
            raise RuntimeError("empty layer cache")
        return self._k[:, :, : self.length], self._v[:, :, : self.length]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate {self.length} rows to {length}")
        self.length = length

    def _grown(self, old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        b, h, _, d = like.shape
        new = like.new_empty(b, h, capacity, d)
        if old is not None:
            new[:, :, : self.length] = old[:, :, : self.length]
        return new


class KVCache:
    """Per-layer caches of one sequence, whose lengths differ once tokens were dropped.

    ``position_shift[ℓ]``: visual tokens dropped before layer ℓ. ``next_position``: position of
    the next token in the UNcompressed sequence (what HF derives from the full attention mask);
    layer ℓ sees it at ``next_position − position_shift[ℓ]`` == ``layers[ℓ].length``.
    ``pool``/``slot`` are set for a pooled cache (``KVPool.acquire``), else None.
    """

    def __init__(
        self,
        num_layers: int,
        layers: Sequence[LayerCache] | None = None,
        pool: KVPool | None = None,
        slot: int | None = None,
    ) -> None:
        self.layers: list[LayerCache] = (
            list(layers) if layers is not None else [LayerKV() for _ in range(num_layers)]
        )
        if len(self.layers) != num_layers:
            raise ValueError(f"{len(self.layers)} layer caches for {num_layers} layers")
        self.position_shift = [0] * num_layers
        self.next_position = 0
        self.pool, self.slot = pool, slot

    def position(self, layer: int) -> int:
        return self.next_position - self.position_shift[layer]

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def truncate(self, lengths: list[int], next_position: int) -> None:
        """Roll the cache back to earlier per-layer ``lengths`` (e.g. a benchmark rewinding
        decode steps, or speculative tokens that were rejected)."""
        for layer, length in zip(self.layers, lengths, strict=True):
            layer.truncate(length)
        self.next_position = next_position


class SlotLayerKV:
    """One sequence's rows in one layer of a ``KVPool``: buffer[slot, :length]."""

    def __init__(self, k_buffer: torch.Tensor, v_buffer: torch.Tensor, slot: int, layer: int):
        self._k, self._v = k_buffer, v_buffer  # [S, T, Hkv, D], shared with the pool
        self.slot, self.layer = slot, layer
        self.length = 0

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    def reserve(self, n: int) -> int:
        """Claim n more rows (written by the caller, e.g. a batched decode); returns the old
        length. Raises KVCapacityError past the slot's capacity."""
        start, end = self.length, self.length + n
        if end > self.capacity:
            raise KVCapacityError(
                f"layer {self.layer} needs {end} KV rows, its pool slot holds {self.capacity}"
            )
        self.length = end
        return start

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.reserve(k.shape[2])
        self._k[self.slot, start : self.length] = k[0].transpose(0, 1)  # [n, Hkv, D]
        self._v[self.slot, start : self.length] = v[0].transpose(0, 1)
        return self.view()

    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.length:
            raise RuntimeError("load() needs an empty layer cache")
        self.append(k, v)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, n = self.slot, self.length
        return self._k[s : s + 1, :n].transpose(1, 2), self._v[s : s + 1, :n].transpose(1, 2)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate {self.length} rows to {length}")
        self.length = length


def layer_capacity(
    num_layers: int,
    *,
    max_text: int,
    max_visual: int,
    max_new: int,
    drop_layers: Sequence[int] = (),
    drop_ratios: Sequence[float] = (1.0,),
) -> tuple[int, ...]:
    """KV rows each layer needs for prompts of at most ``max_text`` text and ``max_visual``
    visual tokens plus ``max_new`` generated ones: the layers after drop stage s hold only
    ⌊N·ratio[s+1]⌋ visual rows, so a pool sized by this wastes no memory on dropped tokens."""
    if len(drop_ratios) != len(drop_layers) + 1:
        raise ValueError("drop_ratios needs one more entry than drop_layers")
    out = []
    for layer in range(num_layers):
        stage = sum(1 for d in drop_layers if d <= layer)
        out.append(max_text + math.floor(max_visual * drop_ratios[stage]) + max_new)
    return tuple(out)


class KVPool:
    """A bounded set of preallocated KV slots: per layer ℓ one K and one V buffer
    [slots, capacity[ℓ], Hkv, D]. ``acquire`` hands out a ``KVCache`` over a free slot,
    ``release`` returns it; the lowest free slot is reused first so that the slots of
    in-flight sequences stay dense (batched decode reads the slot range as one view)."""

    def __init__(
        self,
        *,
        num_kv_heads: int,
        head_dim: int,
        slots: int,
        layer_capacity: Sequence[int],
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if slots < 1 or not layer_capacity or min(layer_capacity) < 1:
            raise ValueError("a KV pool needs >= 1 slot and >= 1 row per layer")
        self.num_layers = len(layer_capacity)
        self.slots = slots
        self.capacity = tuple(layer_capacity)
        shape = (num_kv_heads, head_dim)
        self.k = [torch.zeros(slots, t, *shape, device=device, dtype=dtype) for t in self.capacity]
        self.v = [torch.zeros(slots, t, *shape, device=device, dtype=dtype) for t in self.capacity]
        self._free = list(range(slots))  # kept sorted: lowest slot first
        self._in_use: dict[int, KVCache] = {}

    @classmethod
    def for_model(
        cls,
        config: Qwen2Config,
        *,
        slots: int,
        layer_capacity: Sequence[int],
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> KVPool:
        """A pool shaped for a ``Qwen2Config`` (its KV heads and head dim)."""
        if len(layer_capacity) != config.num_hidden_layers:
            raise ValueError("layer_capacity needs one entry per decoder layer")
        return cls(
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            slots=slots,
            layer_capacity=layer_capacity,
            device=device,
            dtype=dtype,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> KVCache:
        if not self._free:
            raise KVPoolExhausted(f"all {self.slots} KV slots are in use")
        slot = self._free.pop(0)
        layers = [SlotLayerKV(self.k[i], self.v[i], slot, i) for i in range(self.num_layers)]
        cache = KVCache(self.num_layers, layers, pool=self, slot=slot)
        self._in_use[slot] = cache
        return cache

    def release(self, cache: KVCache) -> None:
        """Give the slot back; releasing twice, or a cache of another pool, is an error."""
        if (
            cache.pool is not self
            or cache.slot is None
            or self._in_use.get(cache.slot) is not cache
        ):
            raise ValueError("this cache does not hold a slot of this pool")
        del self._in_use[cache.slot]
        self._free.append(cache.slot)
        self._free.sort()
        cache.pool, cache.slot = None, None
