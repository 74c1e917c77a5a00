"""Scoring yes/no questions over one window: the device side of standing conditions.

A *round* is every condition question over the same window of the same streams. Its prompts
differ only after the visual tokens (the question), so the question-independent prefix (the
header and the window's visual tokens through the layers before the first attention-scored
drop, see ``model.prefill``) is computed once, or taken from the engine's prefix cache, and
each question then runs only its own suffix rows from it. Every ``step()`` is one chunk (at most
``chunk_tokens`` rows through one segment of layers), so encode batches run between steps.

Score: P("Yes") / (P("Yes") + P("No")) of the first answer token, i.e. the softmax over the
two logits. Only the *first* token of "Yes" and "No" is compared: with Qwen2's BPE each word is
one token; the tiny demo model's byte tokenizer splits them into bytes, so there it compares
"Y" with "N".

With a shared prefix, the suffixes of a round run together: one batched forward
(``model.suffix_batch.SuffixBatch``: right-padded to the longest, each row with its own
question-scored drop), at most ``SUFFIX_BATCH_MAX`` questions at a time (each row holds its
own copy of the prefix KV). Without sharing, each question runs its full prefill alone.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from model.prefill import PrefillJob, PrefixCache, PrefixState, prefix_job
from model.prompt import Tokenizer
from model.qwen2 import DropPlan, Qwen2LM
from model.suffix_batch import SuffixBatch
from streamer.engine.errors import InvalidRequest

YES_NO_INSTRUCTION = "Answer Yes or No."
SUFFIX_BATCH_MAX = 16  # questions per batched suffix forward (memory: one prefix KV per row)


def yes_no_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """First token ids of "Yes" and "No" (one token each with Qwen2's BPE; bytes "Y" and "N"
    with the byte tokenizer)."""
    yes, no = tokenizer.encode("Yes"), tokenizer.encode("No")
    if not yes or not no or yes[0] == no[0]:
        raise InvalidRequest("the tokenizer cannot tell Yes from No by their first token")
    return yes[0], no[0]


def scoring_question(question: str) -> str:
    return f"{question.strip()} {YES_NO_INSTRUCTION}"


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int) -> float:
    """[V] logits of the first answer token -> P(yes) normalised over {yes, no}."""
    pair = torch.stack([logits[yes_id], logits[no_id]]).float()
    return float(torch.softmax(pair, dim=0)[0].item())


@dataclass(frozen=True, slots=True)
class RoundInput:
    """One question's prompt, spliced: ``embeds`` [1, L, H], visual rows at ``visual_start``."""

    embeds: torch.Tensor
    visual_start: int
    visual_len: int


class ScoreRound:
    """The device work of one round; ``step()`` until it returns the scores (question order).

    ``key``: the prefix-cache key of the shared window (None: no sharing; every question runs
    a full prefill, the baseline the benchmark compares with). ``suffix_batch``: questions per
    batched suffix forward (1: one after another, the benchmark's other baseline).
    """

    def __init__(
        self,
        lm: Qwen2LM,
        inputs: list[RoundInput],
        *,
        drop: DropPlan | None,
        yes_no: tuple[int, int],
        chunk_tokens: int,
        cache: PrefixCache | None,
        key: Hashable | None,
        suffix_batch: int = SUFFIX_BATCH_MAX,
    ) -> None:
        if not inputs:
            raise InvalidRequest("a scoring round needs at least one question")
        self._lm, self._inputs, self._drop = lm, inputs, drop
        self._yes, self._no = yes_no
        self._chunk = chunk_tokens
        self._cache, self._key = cache, key
        self._suffix_batch = max(1, suffix_batch)
        self._state: PrefixState | None = None
        self._prefix: PrefillJob | None = None
        self._job: PrefillJob | None = None
        self._batch: SuffixBatch | None = None
        self.scores: list[float] = []
        self.prefix_hit = False
        if key is not None:
            state = cache.get(key) if cache is not None else None
            if state is not None:
                self._state, self.prefix_hit = state, True
            else:
                first = inputs[0]
                self._prefix = prefix_job(
                    lm,
                    first.embeds[:, : first.visual_start + first.visual_len],
                    visual_start=first.visual_start,
                    drop=drop,
                    chunk_tokens=chunk_tokens,
                )

    @property
    def done(self) -> bool:
        return len(self.scores) == len(self._inputs)

    @torch.inference_mode()
    def step(self) -> tuple[float, ...] | None:
        """One chunk of device work; the scores once every question is scored."""
        if self.done:
            return tuple(self.scores)
        if self._prefix is not None:
            if self._prefix.step():
                self._state = self._prefix.prefix_state()
                self._prefix = None
                if self._cache is not None and self._key is not None:
                    self._cache.put(self._key, self._state)
            return None
        if self._state is not None:
            return self._step_batch(self._state)
        if self._job is None:
            self._job = self._next_job()
        if not self._job.step():
            return None
        out = self._job.output
        assert out is not None
        self._job = None
        self.scores.append(yes_probability(out.logits[0, -1], self._yes, self._no))
        return tuple(self.scores) if self.done else None

    def _step_batch(self, state: PrefixState) -> tuple[float, ...] | None:
        """One chunk of the next batch of suffixes from the shared prefix."""
        if self._batch is None:
            first = len(self.scores)
            items = self._inputs[first : first + self._suffix_batch]
            suffixes = [item.embeds[:, item.visual_start + item.visual_len :] for item in items]
            self._batch = SuffixBatch(self._lm, state, suffixes, chunk_tokens=self._chunk,
                                      token_ids=(self._yes, self._no))  # fmt: skip
        if not self._batch.step():
            return None
        logits = self._batch.logits
        assert logits is not None
        self._batch = None
        self.scores.extend(yes_probability(row, 0, 1) for row in logits)  # [yes, no] columns
        return tuple(self.scores) if self.done else None

    def _next_job(self) -> PrefillJob:
        """No sharing: the next question's whole prompt."""
        item = self._inputs[len(self.scores)]
        return PrefillJob(
            self._lm,
            item.embeds,
            visual_start=item.visual_start,
            visual_len=item.visual_len,
            drop=self._drop,
            chunk_tokens=self._chunk,
        )
