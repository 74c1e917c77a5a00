"""Token generation: greedy or nucleus sampling over the Qwen2 LLM.

``GenerationSession`` is one answer: a prefill (one-shot, in chunks, or resumed from a cached
prefix state, see ``model.prefill``), then decode steps. Its cache is a private growable one
by default, or a slot of a ``model.kv.KVPool``; pooled sessions can decode together with
``decode_batch`` (one forward for every in-flight answer, greedy ids identical to one at a
time). ``generate`` runs a session to the end. Stop ids (``<|im_end|>``) end the answer and are
not part of it. Usage by a device runner::

    session = GenerationSession(lm, embeds, visual_start=s, visual_len=n, drop=plan,
                                sampling=params, stop_ids=stops, cache=pool.acquire(),
                                chunk_tokens=2048)           # or prefix=state, embeds=suffix
    while not session.prefill_step():   # interleave other device work between chunks
        ...
    first = session.last_token           # None when the first token was a stop id
    while live := [s for s in sessions if not s.done]:
        new_ids = decode_batch(lm, live)  # one token (or None when it finished) per session
    pool.release(session.cache)

Only sampling reads a value back from the device: one ``tolist()`` per batched step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch

from model.kv import KVCache
from model.prefill import PrefillJob, PrefixState
from model.qwen2 import DropPlan, PrefillOutput, Qwen2LM, host_ints


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 keeps every token
    seed: int | None = None  # None = a fresh random seed per session

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[V] probabilities -> [V] renormalised over the smallest set whose mass reaches top_p.

    Same rule as HF's TopPLogitsWarper: drop tokens whose cumulative mass, counted from the
    least likely, stays <= 1 − top_p; the most likely token always survives.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs)  # ascending
    drop_sorted = torch.cumsum(sorted_probs, dim=-1) <= 1.0 - top_p
    drop_sorted[-1] = False
    kept = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
    return kept / kept.sum()


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """[V] logits -> a 0-d int64 tensor on the device (no read-back)."""
    if params.temperature == 0.0:
        return torch.argmax(logits)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=generator)[0]


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """[V] logits -> the next token id: argmax when temperature is 0, else a nucleus sample."""
    return int(_pick(logits, params, generator).item())


def next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """[B, V] logits -> B token ids, each row as ``next_token`` would pick it (same generator
    draws), with one read-back for the whole batch."""
    if all(p.temperature == 0.0 for p in params):
        return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]
    picks = [_pick(row, p, g) for row, p, g in zip(logits, params, generators, strict=True)]
    return [int(t) for t in torch.stack(picks).tolist()]


class GenerationSession:
    """One answer: the prefill (``prefill()`` at once, or ``prefill_step()`` per chunk), then
    ``step()`` (alone) or ``decode_batch`` (with others) until ``done``.

    ``cache``: where the KV goes (default: a private growable cache; a pooled slot enables
    ``decode_batch``). ``prefix``: a ``PrefixState`` to resume from, in which case
    ``inputs_embeds`` are the rows after the visual tokens only and ``visual_*``/``drop``
    must match the prefix's. ``chunk_tokens``: rows per prefill step (None = whole segments).
    ``capture_prefix``: keep the prompt's question-independent prefix as ``captured_prefix``
    once prefilled (for a ``PrefixCache``; ``inputs_embeds`` must then end with the question).
    """

    def __init__(
        self,
        lm: Qwen2LM,
        inputs_embeds: torch.Tensor,
        *,
        visual_start: int,
        visual_len: int,
        drop: DropPlan | None,
        sampling: SamplingParams,
        stop_ids: frozenset[int],
        cache: KVCache | None = None,
        chunk_tokens: int | None = None,
        prefix: PrefixState | None = None,
        capture_prefix: bool = False,
    ) -> None:
        self.lm = lm
        self.visual_start, self.visual_len, self.drop = visual_start, visual_len, drop
        self.sampling = sampling
        self.stop_ids = stop_ids
        self.generator = torch.Generator(device=lm.device)
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)
        self.done = False
        self.finish_reason: Literal["stop", "length"] | None = None
        self.new_tokens: list[int] = []
        self.last_token: int | None = None  # the newest token, None after a stop
        self.prefill_output: PrefillOutput | None = None
        if prefix is None:
            self._job: PrefillJob | None = PrefillJob(
                lm,
                inputs_embeds,
                visual_start=visual_start,
                visual_len=visual_len,
                drop=drop,
                cache=cache,
                chunk_tokens=chunk_tokens,
                capture_prefix=capture_prefix,
            )
        else:
            if capture_prefix:
                raise ValueError("a session resumed from a prefix has no prefix to capture")
            expected = (prefix.visual_start, prefix.visual_len, prefix.drop)
            if expected != (visual_start, visual_len, drop):
                raise ValueError("visual span and drop plan must match the prefix state's")
            self._job = PrefillJob.resume(
                lm, prefix, inputs_embeds, cache=cache, chunk_tokens=chunk_tokens
            )
        self.cache: KVCache = self._job.cache
        self.captures_prefix = capture_prefix
        self.captured_prefix: PrefixState | None = None  # set by the prefill when capturing

    def _accept(self, token: int) -> int | None:
        """Record a picked token, or finish on a stop id / the length limit."""
        if token in self.stop_ids:
            self.done, self.finish_reason = True, "stop"
            self.last_token = None
            return None
        self.new_tokens.append(token)
        self.last_token = token
        if len(self.new_tokens) >= self.sampling.max_new_tokens:
            self.done, self.finish_reason = True, "length"
        return token

    @property
    def prefilled(self) -> bool:
        return self.prefill_output is not None

    def prefill_step(self) -> bool:
        """Run one prefill chunk; True once the prefill is done (the first token is then in
        ``last_token`` / ``new_tokens``, or the session is done on a stop id)."""
        if self._job is None:
            return True
        if not self._job.step():
            return False
        self.prefill_output = self._job.output
        if self.captures_prefix:
            self.captured_prefix = self._job.prefix_state()
        self._job = None  # drop the job's hidden states: the cache holds what is needed now
        assert self.prefill_output is not None
        self._accept(next_token(self.prefill_output.logits[0, -1], self.sampling, self.generator))
        return True

    def prefill(self) -> int | None:
        """Run the (rest of the) prompt; return the first new token (None if it is a stop id)."""
        if self._job is None:
            raise RuntimeError("prefill() already ran for this session")
        while not self.prefill_step():
            pass
        return self.last_token

    def step(self) -> int | None:
        """Feed the last token, return the next one; None once finished."""
        if self.prefill_output is None:
            raise RuntimeError("step() before prefill()")
        if self.done:
            return None
        if self.cache.pool is not None:
            return decode_batch(self.lm, [self])[0]
        assert self.last_token is not None
        logits = self.lm.decode(self.last_token, self.cache)
        return self._accept(next_token(logits, self.sampling, self.generator))


def decode_batch(lm: Qwen2LM, sessions: list[GenerationSession]) -> list[int | None]:
    """One decode step for every session (prefilled, not done, caches in one ``KVPool``):
    one forward over the batch, then one read-back for all picks. Returns each session's new
    token, or None where it just finished on a stop id."""
    if not sessions:
        return []
    for session in sessions:
        if session.prefill_output is None or session.done or session.last_token is None:
            raise ValueError("decode_batch needs prefilled sessions that are not done")
    tokens = host_ints([cast(int, s.last_token) for s in sessions], lm.device)
    logits = lm.decode_batch(tokens, [s.cache for s in sessions])  # [B, V]
    picks = next_tokens(logits, [s.sampling for s in sessions], [s.generator for s in sessions])
    return [s._accept(t) for s, t in zip(sessions, picks, strict=True)]


def generate(
    lm: Qwen2LM,
    inputs_embeds: torch.Tensor,
    *,
    visual_start: int,
    visual_len: int,
    drop: DropPlan | None,
    sampling: SamplingParams,
    stop_ids: frozenset[int],
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate a whole answer; ``on_token`` is called with each new token as it comes."""
    session = GenerationSession(
        lm,
        inputs_embeds,
        visual_start=visual_start,
        visual_len=visual_len,
        drop=drop,
        sampling=sampling,
        stop_ids=stop_ids,
    )
    token = session.prefill()
    while token is not None:
        if on_token is not None:
            on_token(token)
        token = session.step()
    return session.new_tokens
