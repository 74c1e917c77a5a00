"""Loading the official safetensors checkpoints into ``VideoChatFlash`` (spec §7).

- An explicit name map (``NAME_MAP``) turns every module parameter name into its official key.
- The checkpoint is indexed from the safetensors headers only (single ``model.safetensors`` or
  shards listed in ``model.safetensors.index.json``): key -> file, key -> shape.
- Every expected key is checked against the index before any tensor is read; all missing,
  unexpected and mis-shaped keys are reported together in ONE ``CheckpointError``.
- Tensors are read memory-mapped (``safe_open``), one at a time, converted to the requested
  dtype and device, and installed into a model built on the ``meta`` device, so the process never
  holds two full copies of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from model.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_LISTED = 40  # keys listed per category in an error message (the count is always exact)

# Module parameter prefix -> official checkpoint prefix, first match wins. The module tree mirrors
# the official one below these prefixes (vision.blocks.0.attn.q_bias <->
# model.vision_tower.vision_tower.encoder.blocks.0.attn.q_bias, llm.layers.0... <->
# model.layers.0..., llm.lm_head.weight <-> lm_head.weight).
NAME_MAP: tuple[tuple[str, str], ...] = (
    ("vision.", "model.vision_tower.vision_tower.encoder."),
    ("projector.", "model.mm_projector."),
    ("llm.lm_head.", "lm_head."),
    ("llm.", "model."),
)

Shape = tuple[int, ...]


def official_key(param_name: str) -> str:
    """Module parameter name -> official checkpoint key."""
    for module_prefix, official_prefix in NAME_MAP:
        if param_name.startswith(module_prefix):
            return official_prefix + param_name[len(module_prefix) :]
    raise CheckpointError(f"no official name for model parameter {param_name!r}")


def expected_keys(model: nn.Module) -> dict[str, tuple[str, Shape]]:
    """Official key -> (module parameter name, shape) for every parameter (works on meta)."""
    return {official_key(name): (name, tuple(p.shape)) for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Checkpoint index (headers only)


@dataclass(frozen=True)
class CheckpointIndex:
    """Where each tensor lives and its shape, read from the safetensors headers."""

    files: tuple[Path, ...]
    key_file: Mapping[str, Path]
    shapes: Mapping[str, Shape]


def checkpoint_files(folder: Path) -> tuple[Path, ...]:
    """The safetensors files of a checkpoint folder: the shards of the index, or the one file."""
    index_path = folder / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {index_path}: {exc}") from exc
        return tuple(folder / name for name in sorted(set(weight_map.values())))
    single = folder / SINGLE_FILE
    if single.exists():
        return (single,)
    raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def index_checkpoint(folder: Path) -> CheckpointIndex:
    """Read every shard's header: key -> file and key -> shape. Duplicate keys are an error."""
    key_file: dict[str, Path] = {}
    shapes: dict[str, Shape] = {}
    files = checkpoint_files(folder)
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if key in key_file:
                        raise CheckpointError(f"{key} is stored in {key_file[key]} and {path}")
                    key_file[key] = path
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    _check_index_agrees(folder, key_file)
    return CheckpointIndex(files=files, key_file=key_file, shapes=shapes)


def _check_index_agrees(folder: Path, key_file: Mapping[str, Path]) -> None:
    """A sharded index must name exactly the tensors its shards hold, in the right shard."""
    index_path = folder / INDEX_FILE
    if not index_path.exists():
        return
    weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    wrong = sorted(k for k, name in weight_map.items() if key_file.get(k) != folder / name)
    unlisted = sorted(set(key_file) - set(weight_map))
    if wrong or unlisted:
        raise CheckpointError(
            f"{index_path} disagrees with its shards: listed but not in that shard "
            f"{_listing(wrong)}; in a shard but not listed {_listing(unlisted)}"
        )


# ---------------------------------------------------------------------------------------------
# Key checks


def _listing(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:MAX_LISTED])
    more = f", … {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return f"({len(keys)}) [{shown}{more}]"


def check_keys(
    expected: Mapping[str, Shape],
    found: Mapping[str, Shape],
    *,
    source: str,
    ignorable: Iterable[str] = (),
) -> None:
    """Raise ONE CheckpointError listing every missing, unexpected and mis-shaped key."""
    ignored = set(ignorable)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - ignored)
    misshaped = sorted(
        f"{k}: checkpoint {list(found[k])} != model {list(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if misshaped:
        problems.append(f"wrong shapes {_listing(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Loading


def _install(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter ``name`` (possibly on meta) by a frozen parameter holding ``tensor``."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """Duplicate parameter name -> the parameter name that owns it (e.g. a tied lm_head)."""
    owner: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in owner:
            ties[name] = owner[id(param)]
        else:
            owner[id(param)] = name
    return ties


def load_weights(
    model: nn.Module, folder: Path, *, dtype: torch.dtype, device: torch.device
) -> None:
    """Fill every parameter of ``model`` from the checkpoint in ``folder``.

    The model may live on ``meta``; afterwards every parameter is a real ``dtype`` tensor on
    ``device``. Buffers are not touched (the caller recomputes them). Tied parameters (a tied
    ``lm_head``) are loaded once and re-tied; a stored copy of the duplicate key is ignored.
    """
    expected = expected_keys(model)
    ties = tied_parameters(model)  # taken before loading replaces the shared objects
    index = index_checkpoint(folder)
    check_keys(
        {k: shape for k, (_, shape) in expected.items()},
        index.shapes,
        source=str(folder),
        ignorable=[official_key(name) for name in ties],
    )
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(index.key_file[key], []).append(key)
    for path, keys in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in keys:  # one tensor at a time: mmap slice -> dtype/device -> model
                    tensor = f.get_tensor(key).to(device=device, dtype=dtype)
                    _install(model, expected[key][0], tensor)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    for duplicate, owner in ties.items():
        module_name, _, leaf = duplicate.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, model.get_parameter(owner))
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"parameters left unloaded: {_listing(left)}")
