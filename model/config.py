"""The checkpoint's ``config.json``, parsed into typed, validated values (spec §7).

The official file is a transformers ``Qwen2Config`` subclass with the multimodal keys added; it
carries many keys this path never reads (``image_grid_pinpoints``, ``mm_pos_num_frames``, …), so
unknown keys are ignored here. Every key we *do* read is checked, and a value we do not implement
raises ``UnsupportedConfigError`` naming the key and the value. A missing or mistyped required
value raises ``CheckpointError``.

Keys deliberately not used: ``rope_scaling`` (the official remote code ignores it too, §10.11),
``image_aspect_ratio`` / ``image_grid_pinpoints`` (anyres tiling of still images is not
implemented: a still image is one square frame, as in the golden image path),
``mm_pos_num_frames``, ``mm_num_compress_latents``, ``min_slow_num_frames``, ``max_num_pixels``
(unused by this path, §7), ``tokenizer_padding_side`` (batch size 1, no padding).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from model.errors import CheckpointError, UnsupportedConfigError
from model.qwen2 import DropPlan, Qwen2Config
from model.vision import VisionConfig

# The tower name picks the input size (builder.py:24-27); registry, not substring dispatch.
VISION_TOWER_IMAGE_SIZE: Mapping[str, int] = {"umt-hd-large": 448, "umt-large": 224}
UMT_LARGE = VisionConfig(width=1024, declared_layers=24, num_heads=16, patch_size=16)

# Keys whose only implemented values are these (the released checkpoints' values).
SUPPORTED_VALUES: Mapping[str, tuple[Any, ...]] = {
    "model_type": ("videochat_flash_qwen", "llava_qwen_flash"),
    "mm_projector_type": ("tome16_mlp_hd64",),
    "vision_encode_type": ("video_image",),
    "mm_patch_merge_type": ("spatial_nopad",),
    "mm_newline_position": ("nothing",),
    "mm_vision_select_feature": ("patch",),
    "frame_aspect_ratio": ("square",),
    "hidden_act": ("silu",),
    "mm_local_num_frames": (4,),
    "use_sliding_window": (False,),
    "mm_use_im_start_end": (False,),
    "mm_use_im_patch_token": (False,),
}
DROP_KINDS: tuple[str, ...] = ("uniform", "attention", "uniform0_attention")
TOKENS_PER_FRAME = 16  # "tome16": 16 tokens per frame, 64 per 4-frame clip
TOKENS_PER_IMAGE = 64  # a still image is merged to 64 tokens as well

# golden_tiny_vision_cfg key -> VisionConfig field (the tiny geometry of the golden folders).
TINY_VISION_KEYS: Mapping[str, str] = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_size": "width",
    "num_hidden_layers": "declared_layers",
    "return_idx": "select_layer",
    "num_attention_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "tubelet_size": "tubelet_size",
    "num_frames": "num_frames",
    "layernorm_eps": "layernorm_eps",
    "final_layernorm_eps": "final_layernorm_eps",
    "pretrain_grid": "pretrain_grid",
    "ckpt_num_frame": "ckpt_num_frames",
}


@dataclass(frozen=True)
class VideoChatFlashConfig:
    """Everything the model needs from ``config.json``, derived values computed once."""

    vision_tower: str  # official tower name, e.g. "umt-hd-large"
    vision: VisionConfig
    llm: Qwen2Config
    projector_type: str = "tome16_mlp_hd64"
    drop: DropPlan | None = None  # the checkpoint's own dropping (mm_llm_compress); often off
    tokenizer_model_max_length: int | None = None  # official silent cut; we refuse instead
    sliding_window: int | None = None  # informational: never applied (spec §10.10)

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def frames_per_clip(self) -> int:
        return self.vision.num_frames

    @property
    def tokens_per_clip(self) -> int:
        return TOKENS_PER_FRAME * self.vision.num_frames

    @property
    def tokens_per_image(self) -> int:
        return TOKENS_PER_IMAGE

    def canonical_json(self) -> str:
        """A stable JSON string of every value (for fingerprints)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# Small validators


def _get(
    raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    """raw[key] checked against ``kind`` (bool is never accepted as a number)."""
    if key not in raw or raw[key] is None:
        if default is ...:
            raise CheckpointError(f"config.json: required key {key!r} is missing")
        return default
    value = raw[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise CheckpointError(f"config.json: {key}={value!r} is not a {kind}")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise CheckpointError(f"config.json: {key}={value!r} is not a {kind}")
    return value


def _check_supported(raw: Mapping[str, Any]) -> None:
    for key, allowed in SUPPORTED_VALUES.items():
        value = raw.get(key)
        if value is None:
            continue
        # bool and int compare equal in Python (0 == False): check the type as well.
        same_type = isinstance(value, bool) == isinstance(allowed[0], bool)
        if not same_type or value not in allowed:
            raise UnsupportedConfigError(
                f"config.json: {key}={value!r} is not supported (supported: {list(allowed)})"
            )


def drop_problem(
    kind: str, layers: tuple[int, ...], ratios: tuple[float, ...], num_layers: int
) -> str | None:
    """Why (kind, layers, ratios) is not a valid drop plan for ``num_layers`` layers, or None.

    A drop after layer ℓ scores with layer ℓ's norm/q/k, so 1 <= ℓ < num_layers.
    """
    if kind not in DROP_KINDS:
        return f"drop kind {kind!r} is not supported (supported: {list(DROP_KINDS)})"
    if len(ratios) != len(layers) + 1 or not ratios or ratios[0] != 1.0:
        return f"ratios {list(ratios)} need len(layers)+1 entries starting with 1.0"
    if any(not 0.0 < r <= 1.0 for r in ratios) or list(ratios) != sorted(ratios, reverse=True):
        return f"ratios {list(ratios)} must be in (0, 1] and not increase"
    if list(layers) != sorted(set(layers)) or any(not 1 <= ell < num_layers for ell in layers):
        return (
            f"drop layers {list(layers)} must be strictly increasing, each in "
            f"[1, {num_layers - 1}] (the model has {num_layers} decoder layers)"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Parsers


def parse_vision(raw: Mapping[str, Any]) -> tuple[str, VisionConfig]:
    """The tower name and its geometry (UMT-L, or the golden folders' tiny geometry)."""
    tower = _get(raw, "mm_vision_tower", str)
    if tower not in VISION_TOWER_IMAGE_SIZE:
        raise UnsupportedConfigError(
            f"config.json: mm_vision_tower={tower!r} is not supported "
            f"(supported: {list(VISION_TOWER_IMAGE_SIZE)})"
        )
    select_layer = _get(raw, "mm_vision_select_layer", int, -2)
    num_frames = _get(raw, "mm_local_num_frames", int, 4)
    vision = dataclasses.replace(
        UMT_LARGE,
        image_size=VISION_TOWER_IMAGE_SIZE[tower],
        select_layer=select_layer,
        num_frames=num_frames,
    )
    tiny = raw.get("golden_tiny_vision_cfg")
    if tiny is not None:
        vision = _apply_tiny_vision(vision, tiny)
        if vision.select_layer != select_layer:
            raise UnsupportedConfigError(
                f"config.json: golden_tiny_vision_cfg.return_idx={vision.select_layer} differs "
                f"from mm_vision_select_layer={select_layer}"
            )
    _check_vision(vision)
    mm_hidden = _get(raw, "mm_hidden_size", int, vision.width)
    if mm_hidden != vision.width:
        raise UnsupportedConfigError(
            f"config.json: mm_hidden_size={mm_hidden} differs from the vision width {vision.width}"
        )
    return tower, vision


def _apply_tiny_vision(vision: VisionConfig, tiny: Any) -> VisionConfig:
    if not isinstance(tiny, Mapping):
        raise CheckpointError(f"config.json: golden_tiny_vision_cfg={tiny!r} is not an object")
    if tiny.get("qkv_bias", True) is not True:
        raise UnsupportedConfigError("config.json: golden_tiny_vision_cfg.qkv_bias must be true")
    unknown = sorted(set(tiny) - set(TINY_VISION_KEYS) - {"qkv_bias"})
    if unknown:
        raise UnsupportedConfigError(f"config.json: golden_tiny_vision_cfg has unknown {unknown}")
    fields = {f.name: f.type for f in dataclasses.fields(VisionConfig)}
    updates: dict[str, Any] = {}
    for key, field in TINY_VISION_KEYS.items():
        if key in tiny:
            kind = float if fields[field] == "float" else int
            updates[field] = _get(tiny, key, kind)
    return dataclasses.replace(vision, **updates)


def _check_vision(v: VisionConfig) -> None:
    checks = [
        ("patch_size", v.patch_size, v.patch_size > 0 and v.image_size % v.patch_size == 0),
        ("tubelet_size", v.tubelet_size, v.tubelet_size == 1),
        ("num_frames", v.num_frames, v.num_frames == v.ckpt_num_frames == 4),
        ("num_attention_heads", v.num_heads, v.num_heads > 0 and v.width % v.num_heads == 0),
        ("mm_vision_select_layer", v.select_layer, -v.declared_layers <= v.select_layer <= -1),
        ("image_size", v.image_size, v.tokens_per_clip > TOKENS_PER_FRAME * v.num_frames),
    ]
    for key, value, ok in checks:
        if not ok:
            raise UnsupportedConfigError(f"vision config: {key}={value!r} is not supported")


def parse_llm(raw: Mapping[str, Any]) -> Qwen2Config:
    """The Qwen2 decoder's config (HF Qwen2Config defaults where a key is absent)."""
    config = Qwen2Config(
        vocab_size=_get(raw, "vocab_size", int),
        hidden_size=_get(raw, "hidden_size", int),
        intermediate_size=_get(raw, "intermediate_size", int),
        num_hidden_layers=_get(raw, "num_hidden_layers", int),
        num_attention_heads=_get(raw, "num_attention_heads", int),
        num_key_value_heads=_get(raw, "num_key_value_heads", int),
        rms_norm_eps=_get(raw, "rms_norm_eps", float, 1e-6),
        rope_theta=_get(raw, "rope_theta", float, 10000.0),
        tie_word_embeddings=_get(raw, "tie_word_embeddings", bool, False),
    )
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if config.hidden_size % heads or heads % kv_heads:
        raise UnsupportedConfigError(
            f"config.json: hidden_size={config.hidden_size}, num_attention_heads={heads}, "
            f"num_key_value_heads={kv_heads} do not divide evenly"
        )
    return config


def parse_drop(raw: Mapping[str, Any], num_layers: int) -> DropPlan | None:
    """The checkpoint's own dropping plan; None when ``mm_llm_compress`` is off."""
    if not _get(raw, "mm_llm_compress", bool, False):
        return None
    kind = _get(raw, "llm_compress_type", str, "attention")
    layers = tuple(int(x) for x in _get(raw, "llm_compress_layer_list", list, [8, 16, 24]))
    ratios = tuple(
        float(x) for x in _get(raw, "llm_image_token_ratio_list", list, [1.0, 0.5, 0.25, 0.125])
    )
    problem = drop_problem(kind, layers, ratios, num_layers)
    if problem is not None:
        raise UnsupportedConfigError(f"config.json: llm_compress_*: {problem}")
    return DropPlan(
        kind=cast(Literal["uniform", "attention", "uniform0_attention"], kind),
        layers=layers,
        ratios=ratios,
    )


def parse_config(raw: Mapping[str, Any]) -> VideoChatFlashConfig:
    """Parse the official config.json content."""
    _check_supported(raw)
    tower, vision = parse_vision(raw)
    llm = parse_llm(raw)
    sliding = _get(raw, "sliding_window", int, None)
    return VideoChatFlashConfig(
        vision_tower=tower,
        vision=vision,
        llm=llm,
        projector_type=_get(raw, "mm_projector_type", str),
        drop=parse_drop(raw, llm.num_hidden_layers),
        tokenizer_model_max_length=_get(raw, "tokenizer_model_max_length", int, None),
        sliding_window=sliding,
    )


def load_config(folder: Path) -> VideoChatFlashConfig:
    """Read and parse ``folder/config.json``."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return parse_config(raw)
