"""Parsing the official config.json: geometries, derived LLM config and drop plan, rejections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model.config import load_config, parse_config
from model.errors import CheckpointError, UnsupportedConfigError
from model.qwen2 import DropPlan


def released_config(**overrides: Any) -> dict[str, Any]:
    """A config.json like the released 2B@448 one (spec §4, §7), with overrides."""
    raw: dict[str, Any] = {
        "architectures": ["VideoChatFlashQwenForCausalLM"],
        "model_type": "videochat_flash_qwen",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "image_aspect_ratio": "anyres_nopad",
        "image_grid_pinpoints": [[448, 448], [448, 896]],
        "frame_aspect_ratio": "square",
        "mm_vision_tower": "umt-hd-large",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": 1024,
        "mm_projector_type": "tome16_mlp_hd64",
        "mm_local_num_frames": 4,
        "vision_encode_type": "video_image",
        "mm_patch_merge_type": "spatial_nopad",
        "mm_newline_position": "nothing",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_llm_compress": False,
        "llm_compress_type": "attention",
        "llm_compress_layer_list": [8, 16, 24],
        "llm_image_token_ratio_list": [1.0, 0.5, 0.25, 0.125],
        "mm_pos_num_frames": 8,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 32768,
        "use_sliding_window": False,
        "sliding_window": 131072,
    }
    raw.update(overrides)
    return raw


def test_released_2b_448() -> None:
    config = parse_config(released_config())
    v = config.vision
    assert (v.image_size, v.patch_size, v.width, v.num_heads) == (448, 16, 1024, 16)
    assert (v.declared_layers, v.built_layers) == (24, 23)
    assert (v.tokens_per_frame, v.tokens_per_clip) == (784, 3136)
    assert (config.tokens_per_clip, config.frames_per_clip, config.image_size) == (64, 4, 448)
    llm = config.llm
    assert (llm.hidden_size, llm.num_hidden_layers, llm.intermediate_size) == (1536, 28, 8960)
    assert (llm.num_attention_heads, llm.num_key_value_heads, llm.vocab_size) == (12, 2, 151936)
    assert llm.rope_theta == 1e6 and not llm.tie_word_embeddings
    assert config.drop is None  # mm_llm_compress false: released checkpoints ship it off
    assert config.tokenizer_model_max_length == 32768


def test_umt_large_is_224() -> None:
    config = parse_config(released_config(mm_vision_tower="umt-large"))
    assert config.image_size == 224 and config.vision.tokens_per_clip == 784


def test_model_card_drop_recipe() -> None:
    config = parse_config(
        released_config(
            mm_llm_compress=True,
            llm_compress_type="uniform0_attention",
            llm_compress_layer_list=[4, 18],
            llm_image_token_ratio_list=[1, 0.75, 0.25],
        )
    )
    assert config.drop == DropPlan(
        kind="uniform0_attention", layers=(4, 18), ratios=(1.0, 0.75, 0.25)
    )


def test_golden_tiny_vision_cfg(golden: Any) -> None:
    raw = json.loads((golden.checkpoint / "config.json").read_text())
    config = load_config(golden.checkpoint)
    tiny = raw["golden_tiny_vision_cfg"]
    assert config.vision.image_size == tiny["image_size"]
    assert config.vision.width == tiny["hidden_size"] == raw["mm_hidden_size"]
    assert (
        config.vision.built_layers == tiny["num_hidden_layers"] + raw["mm_vision_select_layer"] + 1
    )
    assert config.llm.vocab_size == raw["vocab_size"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mm_projector_type", "mlp2x_gelu"),
        ("mm_vision_tower", "internvideo2"),
        ("mm_vision_tower", "umt-hd"),
        ("mm_patch_merge_type", "spatial_unpad"),
        ("mm_newline_position", "frame"),
        ("vision_encode_type", "image"),
        ("mm_local_num_frames", 8),
        ("use_sliding_window", True),
        ("use_sliding_window", 0),  # 0 == False in Python, but not the same config value
        ("model_type", "llava_llama"),
        ("hidden_act", "gelu"),
        ("mm_hidden_size", 768),
        ("mm_vision_select_layer", 3),
    ],
)
def test_rejects_unsupported_value_naming_key_and_value(key: str, value: Any) -> None:
    with pytest.raises(UnsupportedConfigError) as info:
        parse_config(released_config(**{key: value}))
    assert key in str(info.value) and str(value) in str(info.value)


@pytest.mark.parametrize(
    ("compress", "message"),
    [
        ({"llm_compress_type": "uniform1_attention"}, "uniform1_attention"),
        ({"llm_compress_layer_list": [4, 28], "llm_image_token_ratio_list": [1, 0.5, 0.2]}, "28"),
        ({"llm_compress_layer_list": [4], "llm_image_token_ratio_list": [1, 0.5, 0.2]}, "ratios"),
        ({"llm_compress_layer_list": [18, 4], "llm_image_token_ratio_list": [1, 0.5, 0.2]}, "[18"),
        ({"llm_compress_layer_list": [4], "llm_image_token_ratio_list": [0.5, 0.2]}, "1.0"),
    ],
)
def test_rejects_bad_drop_settings(compress: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedConfigError, match="llm_compress") as info:
        parse_config(released_config(mm_llm_compress=True, **compress))
    assert message in str(info.value)


def test_missing_or_mistyped_required_key_is_a_checkpoint_error() -> None:
    raw = released_config()
    del raw["hidden_size"]
    with pytest.raises(CheckpointError, match="hidden_size"):
        parse_config(raw)
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        parse_config(released_config(num_hidden_layers="28"))
    with pytest.raises(CheckpointError, match="vocab_size"):
        parse_config(released_config(vocab_size=True))


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_config(tmp_path)


def test_canonical_json_is_stable_and_distinguishes_configs() -> None:
    a, b = parse_config(released_config()), parse_config(released_config())
    assert a.canonical_json() == b.canonical_json()
    c = parse_config(released_config(mm_vision_tower="umt-large"))
    assert a.canonical_json() != c.canonical_json()
