"""``load_model``: from the ``model:`` settings to a ready model, tokenizer and fingerprint.

``settings.checkpoint`` is "tiny" (built in, seeded, no download), a local folder in the official
layout (config.json, safetensors single or sharded, tokenizer.json), or a Hugging Face hub id
(the local cache first; a download only where a network exists). Never downloads in tests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from model.attention import resolve_attention
from model.config import TOKENS_PER_FRAME, drop_problem, load_config
from model.errors import CheckpointError, ConfigError
from model.prompt import Tokenizer, byte_level_tokenizer, load_tokenizer
from model.qwen2 import DropPlan
from model.settings import DropSettings, ModelSettings
from model.tiny import build_tiny, tiny_config
from model.videochat_flash import VideoChatFlash
from model.weights import checkpoint_files, load_weights

HUB_PATTERNS = ("*.json", "*.safetensors", "merges.txt", "vocab.json")
SAMPLE_BYTES = 1 << 16  # bytes hashed at each of SAMPLES offsets per weight file
SAMPLES = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: VideoChatFlash
    tokenizer: Tokenizer
    fingerprint: str  # sha256 hex: config + weight identity; stable across runs
    device: torch.device
    dtype: torch.dtype
    attention: str  # resolved backend name
    drop: DropPlan | None  # the dropping to use at prefill (settings override the checkpoint)
    max_context_tokens: int
    max_frames: int = 512  # most frames one query reads (the planner's visual budget)


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; an explicit "cuda" must be available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bfloat16 on CUDA, float32 elsewhere (bf16 matmuls are slow on CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


MODEL_CARD_DROP = DropSettings(
    kind="uniform0_attention", layers=(4, 18), ratios=(1.0, 0.75, 0.25)
)  # the released checkpoints' recipe, for their 28 decoder layers
MODEL_CARD_LAYERS = 28


def recommended_drop(num_layers: int, *, tiny: bool) -> DropSettings:
    """The dropping recipe that fits a checkpoint's depth: the model card's for the released
    28-layer models; for the built-in tiny model the same recipe at the same relative depths.
    Any other depth has no known recipe: the user must choose one (or none)."""
    if num_layers == MODEL_CARD_LAYERS:
        return MODEL_CARD_DROP
    if not tiny:
        raise ConfigError(
            f"model.drop is 'auto' but no dropping recipe is known for a {num_layers}-layer "
            "LLM; set model.drop to a recipe (kind, layers, ratios) or null"
        )
    scaled: list[int] = []
    for layer in MODEL_CARD_DROP.layers:
        at = round(layer * num_layers / MODEL_CARD_LAYERS)
        scaled.append(min(num_layers - 1, max(at, scaled[-1] + 1 if scaled else 1)))
    return MODEL_CARD_DROP.model_copy(update={"layers": tuple(scaled)})


def resolve_drop(
    drop: DropSettings | Literal["auto"] | None,
    num_layers: int,
    *,
    checkpoint: DropPlan | None = None,
    tiny: bool = False,
) -> DropPlan | None:
    """The settings' dropping as a plan, checked against the LLM's depth (ConfigError).

    "auto" takes the checkpoint's own recipe (config.json's ``llm_compress_*``) when it names
    one, else ``recommended_drop``.
    """
    if drop is None:
        return None
    if drop == "auto":
        if checkpoint is not None:
            drop = DropSettings(
                kind=checkpoint.kind, layers=checkpoint.layers, ratios=checkpoint.ratios
            )
        else:
            drop = recommended_drop(num_layers, tiny=tiny)
    problem = drop_problem(drop.kind, drop.layers, drop.ratios, num_layers)
    if problem is not None:
        raise ConfigError(f"model.drop: {problem}")
    return DropPlan(kind=drop.kind, layers=drop.layers, ratios=drop.ratios)


def resolve_checkpoint_folder(checkpoint: str) -> Path:
    """A local folder as is; otherwise a hub id, from the cache first, then downloaded."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    looks_like_hub_id = checkpoint.count("/") == 1 and not checkpoint.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"checkpoint folder {checkpoint!r} does not exist")
    from huggingface_hub import snapshot_download  # imported only when a hub id is used
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(checkpoint, allow_patterns=list(HUB_PATTERNS), local_files_only=True)
        )
    except LocalEntryNotFoundError:
        pass  # not cached: download where a network exists
    except HFValidationError as exc:
        raise CheckpointError(f"{checkpoint!r} is neither a folder nor a hub id") from exc
    try:
        return Path(snapshot_download(checkpoint, allow_patterns=list(HUB_PATTERNS)))
    except (OSError, ValueError) as exc:  # HF's HTTP and not-found errors subclass these
        raise CheckpointError(f"cannot download {checkpoint!r}: {exc}") from exc


def weights_identity(files: tuple[Path, ...]) -> str:
    """sha256 over each weight file's name, size, safetensors header and sampled data chunks.

    Hashing the whole 4–16 GB would take minutes; the header pins names, dtypes and shapes and
    the samples tell apart checkpoints that share a layout.
    """
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(header_len))
            for i in range(SAMPLES):
                f.seek(8 + header_len + (size - 8 - header_len) * i // SAMPLES)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _fingerprint(config_json: str, weights: str) -> str:
    return hashlib.sha256(json.dumps([config_json, weights]).encode()).hexdigest()


def load_model(settings: ModelSettings) -> LoadedModel:
    """Build and load the model the settings name, ready for inference (eval, no grad)."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    attention = resolve_attention(settings.attention, device)
    if settings.checkpoint == "tiny":
        config = tiny_config()
        check_frame_budget(settings, TOKENS_PER_FRAME)
        drop = resolve_drop(settings.drop, config.llm.num_hidden_layers, tiny=True)
        model = build_tiny(settings.tiny_seed, attention=attention).to(device=device, dtype=dtype)
        tokenizer: Tokenizer = byte_level_tokenizer()
        weights = f"tiny-seed-{settings.tiny_seed}"
    else:
        folder = resolve_checkpoint_folder(settings.checkpoint)
        config = load_config(folder)
        check_frame_budget(settings, TOKENS_PER_FRAME)
        drop = resolve_drop(settings.drop, config.llm.num_hidden_layers, checkpoint=config.drop)
        tokenizer = load_tokenizer(folder)
        with torch.device("meta"):  # no memory for weights until each one is loaded
            model = VideoChatFlash(config, attention=attention)
        load_weights(model, folder, dtype=dtype, device=device)
        model.reset_buffers()
        weights = weights_identity(checkpoint_files(folder))
    return LoadedModel(
        model=model.eval().requires_grad_(False),
        tokenizer=tokenizer,
        fingerprint=_fingerprint(config.canonical_json(), weights),
        device=device,
        dtype=dtype,
        attention=attention,
        drop=drop,
        max_context_tokens=settings.max_context_tokens,
        max_frames=settings.max_frames,
    )


def check_frame_budget(settings: ModelSettings, tokens_per_frame: int) -> None:
    """``max_frames`` worth of visual tokens must leave room for text in the context."""
    visual = settings.max_frames * tokens_per_frame
    if visual >= settings.max_context_tokens:
        raise ConfigError(
            f"model.max_frames={settings.max_frames} is {visual} visual tokens "
            f"({tokens_per_frame} per frame), which does not fit "
            f"model.max_context_tokens={settings.max_context_tokens}; lower max_frames or "
            "raise max_context_tokens"
        )
