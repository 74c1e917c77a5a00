"""Incremental detokenisation: the pieces add up to a full decode, incomplete UTF-8 is held
back, and the work per token stays bounded (O(n) over an answer)."""

from __future__ import annotations

from model.detok import IncrementalDetokenizer
from model.prompt import byte_level_tokenizer

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
