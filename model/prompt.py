"""The official VideoChat-Flash prompt (ChatML ``qwen_2`` template, spec §4) and tokenizers.

The prompt carries one ``<image>`` placeholder; ``tokenize_prompt`` tokenizes the text around
it piece by piece and puts ``IMAGE_TOKEN_INDEX`` (−200) in its place, as the official
``tokenizer_image_token``. Qwen has no BOS token, so nothing is prepended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizerModel

from model.errors import CheckpointError, PromptTooLongError

IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)


def time_message(duration_s: float, n_frames: int) -> str:
    """The official "short" time message (HF ``load_video``), seconds with two decimals."""
    return (
        f"The video lasts for {duration_s:.2f} seconds, "
        f"and {n_frames} frames are uniformly sampled from it."
    )


def build_prompt(
    question: str,
    *,
    duration_s: float,
    n_frames: int,
    system: str = SYSTEM_PROMPT,
    video_preamble: str = "",
) -> str:
    """The official ChatML string with one ``<image>``; exact when ``video_preamble`` is empty.

    ``video_preamble`` (e.g. gap or stream notes from the daemon's planner) goes between the
    image and the time message, separated by one space.
    """
    preamble = f"{video_preamble.strip()} " if video_preamble.strip() else ""
    user = f"{IMAGE_PLACEHOLDER}\n{preamble}{time_message(duration_s, n_frames)} {question}"
    return (
        f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    )


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def id_of(self, token: str) -> int | None: ...


class TextTokenizer:
    """A ``tokenizers`` tokenizer behind the ``Tokenizer`` protocol: no special tokens added
    on encode (Qwen has no BOS), special tokens skipped on decode."""

    def __init__(self, tokenizer: HFTokenizerModel) -> None:
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def id_of(self, token: str) -> int | None:
        token_id = self._tokenizer.token_to_id(token)
        return None if token_id is None else int(token_id)


def tokenize_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids with −200 at the first ``<image>``; each text piece is tokenized on its own.

    The template puts the one ``<image>`` before any user text, so a question that itself says
    ``<image>`` stays text (the official code would splice the video twice and fail).
    """
    before, placeholder, after = prompt.partition(IMAGE_PLACEHOLDER)
    if not placeholder:
        return tokenizer.encode(prompt)
    return [*tokenizer.encode(before), IMAGE_TOKEN_INDEX, *tokenizer.encode(after)]


def plain_text(text: str) -> str:
    """User text that cannot open or close a chat turn: special-token strings are broken up."""
    for special in SPECIAL_TOKENS:
        text = text.replace(special, special.replace("<|", "< |"))
    return text


def stop_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids that end an answer: ``<|im_end|>`` (the official stop string) and ``<|endoftext|>``."""
    ids = (tokenizer.id_of(IM_END), tokenizer.id_of(ENDOFTEXT))
    return frozenset(i for i in ids if i is not None)


def load_tokenizer(folder: Path) -> TextTokenizer:
    """The checkpoint's ``tokenizer.json`` (Qwen2 byte-level BPE) via the tokenizers library."""
    path = Path(folder) / "tokenizer.json"
    try:
        tokenizer = TextTokenizer(HFTokenizerModel.from_file(str(path)))
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise CheckpointError(f"cannot read tokenizer {path}: {exc}") from exc
    missing = [t for t in SPECIAL_TOKENS if tokenizer.id_of(t) is None]
    if missing:
        raise CheckpointError(f"tokenizer {path} lacks special tokens {missing}")
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_tokenizer() -> TextTokenizer:
    """In-process byte-level tokenizer for the tiny demo model (no files, no merges).

    Ids 0–255 are the bytes, then ``<|endoftext|>`` 256, ``<|im_start|>`` 257, ``<|im_end|>`` 258.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = HFTokenizerModel(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return TextTokenizer(tokenizer)


def check_context(n_tokens: int, max_context_tokens: int) -> None:
    """Refuse a prompt longer than the context; it is never cut silently (§10.9)."""
    if n_tokens > max_context_tokens:
        raise PromptTooLongError(
            f"prompt has {n_tokens} tokens (text + visual), the context allows "
            f"{max_context_tokens}; ask about a shorter span"
        )
