"""The vision side (and the still-image encoder) against the official outputs of each golden
folder: positional tables, encoder, ToMe, projector, encode, splice, preprocessing, logits.

Driven by the folder: every check states the tensors it reads (``golden_needs``) and is collected
for each folder that has them. The still-image path beyond the encoder has no reference here: the
official code cannot run it at the tiny golden geometry (49 tokens per image, fewer than the 64
it merges to), so only the image encoder output is checked. The model is loaded from the
folder's official checkpoint through ``load_weights`` on a meta-built model, exactly as the
daemon loads a released checkpoint. Float32 on CPU, atol 1e-5.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from model.config import load_config
from model.hico import tome_merge
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess_frames
from model.videochat_flash import VideoChatFlash
from model.vision import positional_table
from model.weights import load_weights

ATOL = 1e-5


@cache
def _load(checkpoint: Path) -> VideoChatFlash:
    with torch.device("meta"):
        model = VideoChatFlash(load_config(checkpoint), attention="sdpa")
    load_weights(model, checkpoint, dtype=torch.float32, device=torch.device("cpu"))
    model.reset_buffers()
    return model.eval()


def _model(golden: Any) -> VideoChatFlash:
    return _load(golden.checkpoint)


def _video(golden: Any) -> torch.Tensor:
    """The preprocessed frames [T, 3, S, S]: ``video`` or, when absent, FORMAT.md's formula."""
    tensors = golden.tensors
    if "video" in tensors:
        return tensors["video"]
    frames = golden.require("video_uint8_thwc")["video_uint8_thwc"].float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return ((frames - mean) / std).permute(0, 3, 1, 2)


def _clips(golden: Any, model: VideoChatFlash) -> torch.Tensor:
    video = _video(golden)
    f = model.frames_per_clip
    return video.reshape(video.shape[0] // f, f, *video.shape[1:])  # [clips, 4, 3, S, S]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def _matching(golden: Any, pattern: str) -> list[re.Match[str]]:
    found = [m for name in sorted(golden.tensors) if (m := re.fullmatch(pattern, name))]
    assert found, f"{golden.name}: no tensor matching {pattern}"
    return found


# --- standalone checks ------------------------------------------------------------------------


@pytest.mark.golden_needs(r"posembed_d\d+_res\d+_(video|image)")
def test_posembed_tables(golden: Any) -> None:
    for match in _matching(golden, r"posembed_d(\d+)_res(\d+)_(video|image)"):
        dim, res, kind = int(match[1]), int(match[2]), match[3]
        table = positional_table(dim, res // 16, 4 if kind == "video" else 1)
        _close(table, golden.tensors[match[0]])


@pytest.mark.golden_needs(r"tome_toy_in_\d+x\d+")
def test_tome_toy(golden: Any) -> None:
    heads = _model(golden).config.vision.num_heads  # the projector's head count
    for match in _matching(golden, r"tome_toy_in_(\d+)x(\d+)"):
        out = golden.require(f"tome_toy_out_64x{match[2]}")[f"tome_toy_out_64x{match[2]}"]
        _close(tome_merge(golden.tensors[match[0]], 64, heads), out)


@pytest.mark.golden_needs("video_uint8_thwc", "video")
def test_preprocess_uint8_frames(golden: Any) -> None:
    t = golden.require("video_uint8_thwc", "video")
    size = _model(golden).image_size
    _close(preprocess_frames(t["video_uint8_thwc"], size), t["video"])


# --- video path --------------------------------------------------------------------------------


@pytest.mark.golden_needs("vision_pos_embed", "vision_img_pos_embed")
def test_vision_positional_buffers(golden: Any) -> None:
    t = golden.require("vision_pos_embed", "vision_img_pos_embed")
    vision = _model(golden).vision
    _close(vision.pos_embed, t["vision_pos_embed"])
    _close(vision.img_pos_embed, t["vision_img_pos_embed"])


@pytest.mark.golden_needs("vision_encoder_out")
def test_vision_encoder_out(golden: Any) -> None:
    expected = golden.require("vision_encoder_out")["vision_encoder_out"]
    model = _model(golden)
    with torch.no_grad():
        _close(model.vision(_clips(golden, model)), expected)


@pytest.mark.golden_needs("vision_encoder_out", "tome_merged")
def test_tome_merged(golden: Any) -> None:
    t = golden.require("vision_encoder_out", "tome_merged")
    model = _model(golden)
    _close(model.projector.merge(t["vision_encoder_out"], model.tokens_per_clip), t["tome_merged"])


@pytest.mark.golden_needs("vision_encoder_out", "projector_out")
def test_projector_out(golden: Any) -> None:
    t = golden.require("vision_encoder_out", "projector_out")
    model = _model(golden)
    with torch.no_grad():
        out = model.projector(t["vision_encoder_out"], model.tokens_per_clip)
    _close(out, t["projector_out"])


@pytest.mark.golden_needs("encode_video_image_out")
def test_encode_clips(golden: Any) -> None:
    expected = golden.require("encode_video_image_out")["encode_video_image_out"]
    model = _model(golden)
    _close(model.encode_clips(_clips(golden, model)), expected)


@pytest.mark.golden_needs("video_uint8_thwc", "encode_video_image_out")
def test_encode_clips_from_uint8_frames(golden: Any) -> None:
    t = golden.require("video_uint8_thwc", "encode_video_image_out")
    model = _model(golden)
    video = preprocess_frames(t["video_uint8_thwc"], model.image_size)
    clips = video.reshape(-1, model.frames_per_clip, *video.shape[1:])
    _close(model.encode_clips(clips), t["encode_video_image_out"])


@pytest.mark.golden_needs("input_ids", "inputs_embeds")
def test_inputs_embeds(golden: Any) -> None:
    t = golden.require("input_ids", "inputs_embeds")
    model = _model(golden)
    embeds, start = model.splice(t["input_ids"], model.encode_clips(_clips(golden, model)))
    _close(embeds, t["inputs_embeds"])
    assert start == int((t["input_ids"][0] == -200).nonzero())


@pytest.mark.golden_needs("input_ids", "logits_nodrop")
def test_logits_nodrop_end_to_end(golden: Any) -> None:
    """Video frames to logits through our whole pipeline (M2's test starts at inputs_embeds)."""
    t = golden.require("input_ids", "logits_nodrop")
    model = _model(golden)
    visual = model.encode_clips(_clips(golden, model))
    embeds, start = model.splice(t["input_ids"], visual)
    out = model.llm.prefill(
        embeds,
        visual_start=start,
        visual_len=visual.shape[0] * visual.shape[1],
        drop=None,
        all_logits=True,
    )
    _close(out.logits, t["logits_nodrop"])


# --- still-image path (frame 0 as an image) ---------------------------------------------------


def _image(golden: Any) -> torch.Tensor:
    return _video(golden)[:1]  # [1, 3, S, S]


@pytest.mark.golden_needs("vision_encoder_out_image")
def test_vision_encoder_out_image(golden: Any) -> None:
    expected = golden.require("vision_encoder_out_image")["vision_encoder_out_image"]
    with torch.no_grad():
        _close(_model(golden).vision(_image(golden)[:, None]), expected)


def test_golden_folders_are_present(all_golden_folders: list[Any]) -> None:
    """Fidelity is proven only if golden data is found: its absence fails, never skips."""
    assert all_golden_folders, "no golden folder found (expected tests/data/golden/)"
