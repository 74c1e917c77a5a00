"""Incremental detokenisation: the text each new token adds, in O(n) over an answer.

Decoding the whole answer after every token costs O(n²). ``IncrementalDetokenizer`` decodes
only a short window: the tokens since the last emitted boundary plus a few before it (so that
tokenizers whose decoding depends on the previous token, such as a leading-space rule, give
the same text as a full decode). Text that ends in an incomplete UTF-8 sequence (the decoder's
U+FFFD replacement character) is held back until the bytes that complete it arrive; ``flush``
emits whatever is left at the end of an answer. Usage::

    detok = IncrementalDetokenizer(tokenizer)
    for token in tokens:
        piece = detok.push(token)   # "" while a character is incomplete
        ...
    tail = detok.flush()
    assert detok.text == tokenizer.decode(tokens)   # for byte-level BPE tokenizers
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4  # tokens decoded before the window, so its first piece decodes as in context
MAX_HELD_TOKENS = 16  # past this many held tokens the text goes out anyway (invalid bytes)


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: context tokens before the unemitted ones
        self._read = 0  # tokens up to here are fully emitted
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._parts)

    def push(self, token: int) -> str:
        """Add one token; return the new text it completes ("" if none yet)."""
        self._ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit the held-back rest (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        context = self._tokenizer.decode(self._ids[self._prefix : self._read])
        window = self._tokenizer.decode(self._ids[self._prefix :])
        held = len(self._ids) - self._read
        incomplete = window.endswith(REPLACEMENT) and held <= MAX_HELD_TOKENS
        if (incomplete and not final) or len(window) <= len(context):
            return ""
        new = window[len(context) :]
        self._parts.append(new)
        self._read = len(self._ids)
        self._prefix = max(0, self._read - CONTEXT_TOKENS)
        return new
