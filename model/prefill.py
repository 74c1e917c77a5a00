"""Prefill of one prompt: one-shot, in resumable chunks, or resumed from a cached prefix.

A prompt runs through the decoder in *segments*: the layers between two dropping points
(spec §5). Inside a segment the rows are independent of the dropping, so a segment can take its
rows in chunks of ``chunk_tokens`` (each chunk attends to the rows before it through the KV
cache, with bottom-right causal masking). At a segment's end the whole sequence's hidden
states are known, the drop fires (uniform stride or the last token's attention), the sequence is
spliced and renumbered, and the next segment starts over the shorter sequence.

Usage::

    job = PrefillJob(lm, embeds, visual_start=s, visual_len=n, drop=plan,
                     cache=pool.acquire(), chunk_tokens=2048)
    while not job.step():        # each step is one chunk through one segment: the device is
        run_an_encode_batch()    # free between steps for other work
    out = job.output             # PrefillOutput (logits of the last row, kept indices, cache)

``Qwen2LM.prefill`` is ``PrefillJob(...).run()`` without chunking.

Prefix reuse. With the model-card recipe ``uniform0_attention`` [4, 18] the first drop is
uniform and the visual tokens come before the question, so layers 0–17 over the header and the
visual tokens do not depend on the question. ``prefix_job`` computes that part once (layers
before the first attention-scored drop, over ``[header, visual]``), ``PrefixState`` holds its KV
and the hidden states entering the first attention-scored layer, and ``PrefillJob.resume`` runs
a question's suffix (the text after the visual tokens) from it: logits equal a full prefill's.
``PrefixCache`` keeps states in a byte-bounded LRU under a key the caller builds from the exact
selection (which segments, which header, which model and drop plan)::

    state = prefix_cache.get(key)
    if state is None:
        state = prefix_job(lm, embeds[:, :s + n], visual_start=s, drop=plan).run_prefix()
        prefix_cache.put(key, state)
    job = PrefillJob.resume(lm, state, embeds[:, s + n:], cache=pool.acquire())

On a miss the state can instead be captured by the question's own full prefill, at no extra
compute: ``PrefillJob(..., capture_prefix=True)``, then ``job.prefix_state()`` once done.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from model.kv import KVCache
from model.qwen2 import (
    DropPlan,
    PrefillOutput,
    Qwen2LM,
    splice_visual,
    stage_keep_count,
    topk_keep,
    uniform_keep,
)


def prefix_stop_layer(drop: DropPlan | None, num_layers: int, visual_len: int) -> int:
    """First layer whose input depends on the question: the first attention-scored drop (its
    score is the last prompt token's attention), or ``num_layers`` when no stage scores."""
    if drop is None or visual_len == 0:
        return num_layers
    for stage, layer in enumerate(drop.layers):
        if drop.stage_kind(stage) == "attention":
            return layer
    return num_layers


@dataclass(frozen=True)
class PrefixState:
    """The question-independent part of a prefill over ``[header, visual]``.

    ``kv[ℓ]`` (ℓ < stop_layer): keys/values [1, Hkv, T_ℓ, D]; ``hidden`` [1, P', H]: the
    rows entering layer ``stop_layer`` (after the uniform drops before it). Immutable: a resumed
    prefill copies the KV into its own cache.
    """

    drop: DropPlan | None
    num_layers: int
    visual_start: int
    visual_len: int
    prompt_len: int  # rows before any dropping: visual_start + visual_len
    stop_layer: int
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    hidden: torch.Tensor
    position_shift: tuple[int, ...]  # layers < stop_layer
    kept_per_stage: tuple[torch.Tensor, ...]
    kept: torch.Tensor
    mass: torch.Tensor | None
    current: int  # visual rows left entering stop_layer

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.kv for t in pair] + [self.hidden]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class _Segment:
    start: int  # first layer
    stop: int  # one past the last layer


class PrefillJob:
    """A resumable prefill of one prompt; see the module docstring.

    ``step()`` runs one unit (one chunk of rows through one segment, or a whole segment
    without chunking) and returns True once finished; ``output`` is then the PrefillOutput.
    ``all_logits`` keeps logits for every row of the compacted sequence, else the last only.
    """

    def __init__(
        self,
        lm: Qwen2LM,
        inputs_embeds: torch.Tensor,
        *,
        visual_start: int,
        visual_len: int,
        drop: DropPlan | None,
        cache: KVCache | None = None,
        chunk_tokens: int | None = None,
        all_logits: bool = False,
        capture_prefix: bool = False,
        _prefix: PrefixState | None = None,
        _stop_layer: int | None = None,
    ) -> None:
        x = inputs_embeds.to(lm.dtype)
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[1] < 1:
            raise ValueError(f"inputs_embeds must be [1, L >= 1, H], got {tuple(x.shape)}")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        n_layers = lm.config.num_hidden_layers
        if _prefix is None and (
            visual_start < 0 or visual_len < 0 or visual_start + visual_len > x.shape[1]
        ):
            raise ValueError(f"visual span {visual_start}+{visual_len} outside length {x.shape[1]}")
        if drop is not None:
            lm.check_drop(drop)
        self.lm, self.drop = lm, drop
        self.visual_start, self.visual_len = visual_start, visual_len
        self.chunk_tokens, self.all_logits = chunk_tokens, all_logits
        self.cache = cache if cache is not None else KVCache(n_layers)
        if any(layer.length for layer in self.cache.layers):
            raise ValueError("a prefill needs an empty KV cache")
        self._prefix = _prefix
        self._stop = n_layers if _stop_layer is None else _stop_layer
        if capture_prefix and (_prefix is not None or _stop_layer is not None):
            raise ValueError("capture_prefix is for a full prefill, not a resumed one")
        # capture: where the question-independent prefix ends (a segment boundary), and the
        # rows after the visual tokens (never dropped, so the same count at every layer)
        self._capture_at = prefix_stop_layer(drop, n_layers, visual_len) if capture_prefix else None
        self._suffix_rows = x.shape[1] - visual_start - visual_len if capture_prefix else 0
        self._captured: PrefixState | None = None
        # layer -> dropping stage that fires before it
        self._stage_at: dict[int, int] = {}
        if drop is not None and visual_len > 0:
            self._stage_at = {layer: s for s, layer in enumerate(drop.layers)}
        bounds = sorted({0, self._stop, *(b for b in self._stage_at if b < self._stop)})
        self._segments = [_Segment(a, b) for a, b in itertools.pairwise(bounds)]
        self._seg = 0
        self._x = x  # rows still to run through the current segment
        self._offset = 0
        self._outs: list[torch.Tensor] = []
        self._hidden: torch.Tensor | None = None  # rows leaving the last segment
        self.output: PrefillOutput | None = None
        if _prefix is None:
            self.kept = torch.arange(visual_len, device=lm.device)
            self.kept_per_stage: list[torch.Tensor] = []
            self.mass: torch.Tensor | None = None
            self.current = visual_len
            self.cache.next_position = x.shape[1]  # decode positions count the whole prompt
        else:
            self.kept, self.mass = _prefix.kept, _prefix.mass
            self.kept_per_stage = list(_prefix.kept_per_stage)
            self.current = _prefix.current
            for layer, (k, v) in enumerate(_prefix.kv):
                self.cache.layers[layer].load(k, v)
                self.cache.position_shift[layer] = _prefix.position_shift[layer]
            self.cache.next_position = _prefix.prompt_len + x.shape[1]
        self._enter_segment()

    @classmethod
    def resume(
        cls,
        lm: Qwen2LM,
        prefix: PrefixState,
        suffix_embeds: torch.Tensor,
        *,
        cache: KVCache | None = None,
        chunk_tokens: int | None = None,
        all_logits: bool = False,
    ) -> PrefillJob:
        """A question's prefill from a prefix state: ``suffix_embeds`` [1, Q >= 1, H] are the
        rows after the visual tokens (time message, question, assistant header)."""
        if prefix.num_layers != lm.config.num_hidden_layers:
            raise ValueError("the prefix state was computed by a model of another depth")
        return cls(
            lm,
            suffix_embeds,
            visual_start=prefix.visual_start,
            visual_len=prefix.visual_len,
            drop=prefix.drop,
            cache=cache,
            chunk_tokens=chunk_tokens,
            all_logits=all_logits,
            _prefix=prefix,
        )

    @property
    def done(self) -> bool:
        return self._hidden is not None

    @property
    def rows_left(self) -> int:
        """Rows the current segment still has to run (a scheduler's cost hint)."""
        return 0 if self.done else self._x.shape[1] - self._offset

    @property
    def next_step_cost(self) -> tuple[int, int]:
        """(rows, layers) the next ``step()`` runs through the decoder: its cost is about
        rows × layers × the per-row layer cost; (0, 0) once done or when the next step is a
        segment's end (a drop, or the final logits)."""
        if self.done or self.rows_left == 0:
            return 0, 0  # done, or only the segment's end (a drop) is left
        segment = self._segments[self._seg]
        rows = (
            self.rows_left if self.chunk_tokens is None else min(self.chunk_tokens, self.rows_left)
        )
        return rows, segment.stop - segment.start

    def _enter_segment(self) -> None:
        segment = self._segments[self._seg]
        for layer in range(segment.start, segment.stop):
            if self._prefix is None or layer >= self._prefix.stop_layer:
                self.cache.position_shift[layer] = self.visual_len - self.current

    @torch.no_grad()
    def step(self) -> bool:
        """Run one chunk of rows through the current segment; True once the prefill is done.

        When chunked, a segment's end (the drop: scoring, splicing; or the final logits) is a
        step of its own, so that no step carries a chunk and the drop together."""
        if self.done:
            return True
        if self._offset == self._x.shape[1]:  # a chunked segment's end, deferred to here
            self._finish_segment()
            return self.done
        segment = self._segments[self._seg]
        start = self._offset
        stop = self._x.shape[1] if self.chunk_tokens is None else start + self.chunk_tokens
        stop = min(stop, self._x.shape[1])
        h = self._x[:, start:stop]  # [1, n, H]
        layers = self.lm.decoder_layers()
        for i in range(segment.start, segment.stop):
            kv = self.cache.layers[i]
            position = kv.length  # rows already cached at this layer precede these
            h = layers[i](h, *self.lm.rope_span(position, position + h.shape[1]), kv)
        self._outs.append(h)
        self._offset = stop
        if stop == self._x.shape[1] and self.chunk_tokens is None:
            self._finish_segment()
        return self.done

    def run(self) -> PrefillOutput:
        """Run to the end; the PrefillOutput."""
        while not self.step():
            pass
        assert self.output is not None
        return self.output

    def _finish_segment(self) -> None:
        y = torch.cat(self._outs, dim=1) if len(self._outs) > 1 else self._outs[0]
        self._outs = []
        boundary = self._segments[self._seg].stop
        prefix = self._prefix
        if prefix is not None and boundary == prefix.stop_layer:
            y = torch.cat([prefix.hidden, y], dim=1)  # the whole sequence from here on
        if boundary == self._capture_at:
            prefix_rows = y.shape[1] - self._suffix_rows
            self._captured = self._snapshot(boundary, y[:, :prefix_rows], self._suffix_rows)
        if boundary == self._stop:
            self._hidden = y
            if self._stop == self.lm.config.num_hidden_layers:
                h = y if self.all_logits else y[:, -1:]
                self.output = PrefillOutput(
                    self.lm.logits(h),
                    self.cache,
                    tuple(self.kept_per_stage),
                    self.kept,
                    self.mass,
                )
            return
        if prefix is None or boundary >= prefix.stop_layer:
            y = self._drop(boundary, y)  # else the prefix already applied this (uniform) drop
        self._x, self._offset, self._seg = y, 0, self._seg + 1
        self._enter_segment()

    def _drop(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The drop stage that fires before ``layer`` on the whole sequence x [1, L, H]."""
        assert self.drop is not None
        stage = self._stage_at[layer]
        keep = stage_keep_count(self.visual_len, self.drop.ratios[stage + 1])
        span = slice(self.visual_start, self.visual_start + self.current)
        if self.drop.stage_kind(stage) == "uniform":
            idx = uniform_keep(self.current, keep).to(x.device)
            self.mass = None if self.mass is None else self.mass[idx]
        else:
            cos, sin = self.lm.rope_span(0, x.shape[1])
            scores = self.lm.decoder_layers()[layer].visual_scores(x, cos, sin)
            visual_mass = scores[span]  # [current] float32
            idx = topk_keep(visual_mass, keep)
            self.mass = visual_mass[idx]
        before = self.current
        self.kept, self.current = self.kept[idx], keep
        self.kept_per_stage.append(idx)
        return splice_visual(x, self.visual_start, before, idx)  # [1, L − before + keep, H]

    def prefix_state(self) -> PrefixState:
        """The question-independent prefix as an immutable state: of a finished
        ``prefix_job``, or captured by a full prefill run with ``capture_prefix=True`` (a
        cache miss then costs one plain prefill, not a prefix job plus a resume)."""
        if self._captured is not None:
            return self._captured
        if self._hidden is None or self._prefix is not None or self._capture_at is not None:
            raise RuntimeError("prefix_state() needs a finished prefix_job or a captured prefix")
        return self._snapshot(self._stop, self._hidden, 0)

    def _snapshot(self, stop: int, hidden: torch.Tensor, suffix_rows: int) -> PrefixState:
        """Copies of the first rows of layers < stop (all but the ``suffix_rows`` rows after
        the visual tokens) and of ``hidden`` [1, P', H], the prefix rows entering ``stop``."""
        kv = []
        for layer in self.cache.layers[:stop]:
            k, v = layer.view()
            rows = layer.length - suffix_rows
            kv.append((k[:, :, :rows].clone(), v[:, :, :rows].clone()))
        return PrefixState(
            drop=self.drop,
            num_layers=self.lm.config.num_hidden_layers,
            visual_start=self.visual_start,
            visual_len=self.visual_len,
            prompt_len=self.visual_start + self.visual_len,
            stop_layer=stop,
            kv=tuple(kv),
            hidden=hidden.clone() if suffix_rows else hidden,
            position_shift=tuple(self.cache.position_shift[:stop]),
            kept_per_stage=tuple(self.kept_per_stage),
            kept=self.kept,
            mass=self.mass,
            current=self.current,
        )

    def run_prefix(self) -> PrefixState:
        while not self.step():
            pass
        return self.prefix_state()


def prefix_job(
    lm: Qwen2LM,
    prefix_embeds: torch.Tensor,
    *,
    visual_start: int,
    drop: DropPlan | None,
    chunk_tokens: int | None = None,
) -> PrefillJob:
    """A job computing the question-independent prefix of ``prefix_embeds`` [1, P, H] =
    [header, visual] (the visual rows run to the end); ``run_prefix()`` or ``step()`` until
    done, then ``prefix_state()``. It uses its own growable cache, not a pool slot."""
    visual_len = prefix_embeds.shape[1] - visual_start
    stop = prefix_stop_layer(drop, lm.config.num_hidden_layers, visual_len)
    return PrefillJob(
        lm,
        prefix_embeds,
        visual_start=visual_start,
        visual_len=visual_len,
        drop=drop,
        chunk_tokens=chunk_tokens,
        _stop_layer=stop,
    )


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0  # states larger than the whole budget, never stored


class PrefixCache:
    """Prefix states under caller-built keys, at most ``max_bytes`` in all, least recently
    used evicted first. One owner (the device runner): not thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._states: OrderedDict[Hashable, PrefixState] = OrderedDict()
        self.nbytes = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._states

    def get(self, key: Hashable) -> PrefixState | None:
        state = self._states.get(key)
        if state is None:
            self.stats.misses += 1
            return None
        self._states.move_to_end(key)
        self.stats.hits += 1
        return state

    def put(self, key: Hashable, state: PrefixState) -> bool:
        """Store (or refresh) ``state``; False if it alone exceeds the budget."""
        size = state.nbytes
        if size > self.max_bytes:
            self.stats.rejected += 1
            return False
        self.discard(key)
        while self.nbytes + size > self.max_bytes:
            _, old = self._states.popitem(last=False)
            self.nbytes -= old.nbytes
            self.stats.evictions += 1
        self._states[key] = state
        self.nbytes += size
        return True

    def discard(self, key: Hashable) -> None:
        old = self._states.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._states.clear()
        self.nbytes = 0
