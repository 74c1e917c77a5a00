"""Token generation: greedy or nucleus sampling over the Qwen2 LLM, one step at a time.

``GenerationSession`` splits one answer into a prefill and single decode steps so the daemon's
engine can interleave other work (clip encoding) between steps. ``generate`` runs a session to
the end. Stop ids (``<|im_end|>``) end the answer and are not part of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from model.qwen2 import DropPlan, PrefillOutput, Qwen2LM


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


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """[V] logits -> the next token id: argmax when temperature is 0, else a nucleus sample."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class GenerationSession:
    """One answer: ``prefill()`` once, then ``step()`` until it returns None."""

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
    ) -> None:
        self.lm = lm
        self.inputs_embeds = inputs_embeds  # [1, L, H]
        self.visual_start, self.visual_len, self.drop = visual_start, visual_len, drop
        self.sampling = sampling
        self.stop_ids = stop_ids
        self.generator = torch.Generator(device=lm.lm_head.weight.device)
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)
        self.done = False
        self.finish_reason: Literal["stop", "length"] | None = None
        self.new_tokens: list[int] = []
        self.prefill_output: PrefillOutput | None = None

    def _accept(self, logits: torch.Tensor) -> int | None:
        """Pick a token from [V] logits; record it, or finish on a stop id / the length limit."""
        token = next_token(logits, self.sampling, self.generator)
        if token in self.stop_ids:
            self.done, self.finish_reason = True, "stop"
            return None
        self.new_tokens.append(token)
        if len(self.new_tokens) >= self.sampling.max_new_tokens:
            self.done, self.finish_reason = True, "length"
        return token

    def prefill(self) -> int | None:
        """Run the prompt; return the first new token (None if it is a stop id)."""
        if self.prefill_output is not None:
            raise RuntimeError("prefill() already ran for this session")
        self.prefill_output = self.lm.prefill(
            self.inputs_embeds,
            visual_start=self.visual_start,
            visual_len=self.visual_len,
            drop=self.drop,
        )
        self.inputs_embeds = self.inputs_embeds[:, :0]  # the cache holds what is needed now
        return self._accept(self.prefill_output.logits[0, -1])

    def step(self) -> int | None:
        """Feed the last token, return the next one; None once finished."""
        if self.prefill_output is None:
            raise RuntimeError("step() before prefill()")
        if self.done:
            return None
        logits = self.lm.decode(self.new_tokens[-1], self.prefill_output.cache)
        return self._accept(logits)


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
