"""Several questions' suffixes resumed from one prefix state, as one batched forward.

``PrefillJob.resume`` runs one question's suffix (the rows after the visual tokens) from a
``PrefixState``; a round of standing conditions has many questions over the same window, so
:class:`SuffixBatch` runs them together, batch row b = question b::

    layers < stop_layer   suffix rows only [B, Q, H], attending to the prefix's KV (one copy
                          per row) and to their own earlier rows
    stop_layer            [prefix hidden, suffix] [B, P' + Q, H]; each row's attention-scored
                          drop keeps its own visual tokens (its last real token scores them)
    later layers          the whole (shorter) rows, fresh KV; further drops per row

Suffixes of different lengths are right-padded to the longest, Q. Under the causal mask a real
row never sees a padding row (every padding row comes after every real one of its sequence),
and every real row keeps its position (padding adds rows at the end only), so no extra mask is
needed and each row's logits equal its own ``PrefillJob.resume`` up to floating-point rounding
of the batched products. Drops score with each row's last *real* token; the logits are read at
each row's last real row.

``step()`` is one chunk (at most ``chunk_tokens`` rows in all, i.e. ``chunk_tokens // B`` rows
of every sequence) through one segment of layers, or, when chunked, one row's drop at a
segment's end, as ``PrefillJob.step`` is one prompt's: no step costs more than one question's
would, so the caller can run other device work between steps.
"""

from __future__ import annotations

import itertools

import torch

from model.kv import LayerKV
from model.prefill import PrefixState
from model.qwen2 import Qwen2LM, splice_visual, stage_keep_count, topk_keep, uniform_keep


class SuffixBatch:
    """Suffixes [1, Q_b, H] of B questions, resumed from one ``PrefixState``; ``step()`` until
    True, then ``logits`` [B, V] (the first answer token's, per question, in order), or
    [B, K] for the ``token_ids`` given (only those columns of the LM head are computed)."""

    def __init__(
        self,
        lm: Qwen2LM,
        prefix: PrefixState,
        suffixes: list[torch.Tensor],
        *,
        chunk_tokens: int | None = None,
        token_ids: tuple[int, ...] | None = None,
    ) -> None:
        if not suffixes:
            raise ValueError("a suffix batch needs at least one suffix")
        if any(s.dim() != 3 or s.shape[0] != 1 or s.shape[1] < 1 for s in suffixes):
            raise ValueError("every suffix must be [1, Q >= 1, H]")
        if prefix.num_layers != lm.config.num_hidden_layers:
            raise ValueError("the prefix state was computed by a model of another depth")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.lm, self.prefix = lm, prefix
        self._token_ids = None if token_ids is None else torch.tensor(token_ids, device=lm.device)
        self.lengths = [s.shape[1] for s in suffixes]
        batch, longest = len(suffixes), max(self.lengths)
        x = suffixes[0].new_zeros(batch, longest, suffixes[0].shape[2], dtype=lm.dtype)
        for b, suffix in enumerate(suffixes):
            x[b, : suffix.shape[1]] = suffix[0].to(lm.dtype)
        self._rows_per_chunk = None if chunk_tokens is None else max(1, chunk_tokens // batch)
        n_layers = lm.config.num_hidden_layers
        self._kv = [LayerKV() for _ in range(n_layers)]  # the prefix's rows: at first use
        self._loaded: set[int] = set()
        drop = prefix.drop
        self._stage_at: dict[int, int] = {}
        if drop is not None and prefix.visual_len > 0:
            self._stage_at = {layer: s for s, layer in enumerate(drop.layers)}
        bounds = sorted({0, n_layers, prefix.stop_layer, *self._stage_at})
        self._segments = list(itertools.pairwise(bounds))
        self._seg = 0
        self._x = x  # rows still to run through the current segment [B, n, H]
        self._offset = 0
        self._outs: list[torch.Tensor] = []
        self._current = prefix.current  # visual rows left
        self._dropping: tuple[int, torch.Tensor] | None = None  # (layer, rows) mid-drop
        self._dropped: list[torch.Tensor] = []  # the rows already dropped, in order
        self._suffix_only = prefix.stop_layer > 0  # before stop_layer only the suffix runs
        if prefix.stop_layer == 0:  # nothing cached: the whole sequence from the start
            self._x = torch.cat([prefix.hidden.expand(batch, -1, -1), x], dim=1)
        self.logits: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.logits is not None

    def _real_len(self, b: int, rows: int) -> int:
        """Row b's real length in a padded sequence of ``rows`` rows."""
        return rows - (max(self.lengths) - self.lengths[b])

    @torch.no_grad()
    def step(self) -> bool:
        """One chunk of rows through the current segment; True once every logit is known."""
        if self.done:
            return True
        if self._dropping is not None:  # chunked: one row's drop per step
            self._drop_next()
            return False
        if self._offset == self._x.shape[1]:
            self._finish_segment()
            return self.done
        start_layer, stop_layer = self._segments[self._seg]
        start = self._offset
        stop = self._x.shape[1] if self._rows_per_chunk is None else start + self._rows_per_chunk
        stop = min(stop, self._x.shape[1])
        h = self._x[:, start:stop]  # [B, n, H]
        layers = self.lm.decoder_layers()
        for i in range(start_layer, stop_layer):
            if i < len(self.prefix.kv) and i not in self._loaded:
                self._load_prefix(i, h.shape[0])
            position = self._kv[i].length  # rows already cached at this layer precede these
            h = layers[i](h, *self.lm.rope_span(position, position + h.shape[1]), self._kv[i])
        self._outs.append(h)
        self._offset = stop
        if stop == self._x.shape[1] and self._rows_per_chunk is None:
            self._finish_segment()
        return self.done

    def _load_prefix(self, layer: int, batch: int) -> None:
        """One copy of the prefix's keys/values of ``layer`` per row (each row appends its own),
        made at the layer's first step, so that the copies are spread over the steps."""
        k, v = self.prefix.kv[layer]
        self._kv[layer].load(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
        self._loaded.add(layer)

    def run(self) -> torch.Tensor:
        while not self.step():
            pass
        assert self.logits is not None
        return self.logits

    def _finish_segment(self) -> None:
        y = torch.cat(self._outs, dim=1) if len(self._outs) > 1 else self._outs[0]
        self._outs = []
        boundary = self._segments[self._seg][1]
        prefix = self.prefix
        if self._suffix_only and boundary == prefix.stop_layer:
            y = torch.cat([prefix.hidden.expand(y.shape[0], -1, -1), y], dim=1)
            self._suffix_only = False
        if boundary == self.lm.config.num_hidden_layers:
            last = [self._real_len(b, y.shape[1]) - 1 for b in range(y.shape[0])]
            rows = y[torch.arange(y.shape[0], device=y.device), last]  # [B, H]
            if self._token_ids is None:
                self.logits = self.lm.logits(rows)  # [B, V]
            else:
                self.logits = self.lm.logits_of(rows, self._token_ids)  # [B, K]
            return
        self._seg += 1
        if boundary >= prefix.stop_layer and boundary in self._stage_at:
            # before stop_layer the prefix applied it already
            self._dropping = (boundary, y)
            while self._rows_per_chunk is None and self._dropping is not None:
                self._drop_next()
            return
        self._x, self._offset = y, 0

    def _drop_next(self) -> None:
        """The drop stage before the next segment, for the next row of x [B, L, H]; after the
        last row the next segment starts over [B, L − current + keep, H]."""
        assert self._dropping is not None and self.prefix.drop is not None
        layer, x = self._dropping
        drop, b = self.prefix.drop, len(self._dropped)
        stage = self._stage_at[layer]
        keep = stage_keep_count(self.prefix.visual_len, drop.ratios[stage + 1])
        start, current = self.prefix.visual_start, self._current
        if drop.stage_kind(stage) == "uniform":
            idx = uniform_keep(current, keep).to(x.device)
        else:
            real = x[b : b + 1, : self._real_len(b, x.shape[1])]  # its last real token scores
            cos, sin = self.lm.rope_span(0, real.shape[1])
            scores = self.lm.decoder_layers()[layer].visual_scores(real, cos, sin)
            idx = topk_keep(scores[start : start + current], keep)
        self._dropped.append(splice_visual(x[b : b + 1], start, current, idx))
        if len(self._dropped) == x.shape[0]:
            self._x, self._offset = torch.cat(self._dropped, dim=0), 0
            self._current, self._dropped, self._dropping = keep, [], None
