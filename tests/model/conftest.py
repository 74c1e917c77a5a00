"""Golden folders: every folder under tests/data/golden/ plus FLASHWATCH_GOLDEN_DIRS.

A golden folder holds ``checkpoint/`` (official format), ``golden.safetensors`` (inputs and the
official outputs) and ``golden_meta.json``; see ``tests/data/golden/FORMAT.md``.
The folders are reference data produced by the official implementation, kept in the repository so
that a clone is self-sufficient.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

GOLDEN_ROOT = Path(__file__).resolve().parents[1] / "data" / "golden"


@dataclass(frozen=True)
class GoldenFolder:
    name: str
    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return _load_tensors(self.path)

    @property
    def meta(self) -> dict[str, Any]:
        meta_path = self.path / "golden_meta.json"
        return json.loads(meta_path.read_text()) if meta_path.exists() else {}

    def require(self, *names: str) -> dict[str, torch.Tensor]:
        """The named tensors, or skip the test naming the ones this folder lacks."""
        tensors = self.tensors
        missing = [n for n in names if n not in tensors]
        if missing:
            pytest.skip(f"{self.name}: golden folder has no {', '.join(missing)}")
        return {n: tensors[n] for n in names}


@cache
def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "golden.safetensors"))


def golden_folders() -> list[GoldenFolder]:
    roots: list[Path] = []
    if GOLDEN_ROOT.is_dir():
        roots += sorted(p for p in GOLDEN_ROOT.iterdir() if (p / "golden.safetensors").exists())
    extra = os.environ.get("FLASHWATCH_GOLDEN_DIRS", "")
    roots += [Path(p) for p in extra.split(os.pathsep) if p]
    return [GoldenFolder(name=p.name, path=p) for p in roots]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise any test that takes ``golden`` over every golden folder, named by folder."""
    if "golden" in metafunc.fixturenames:
        folders = golden_folders()
        metafunc.parametrize("golden", folders, ids=[f.name for f in folders])


@pytest.fixture
def all_golden_folders() -> list[GoldenFolder]:
    return golden_folders()


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """Tiny tensors on a loaded 2-core host: intra-op threads only add waiting (SDPA with
    ``enable_gqa`` took 12 ms instead of 0.01 ms per call with 2 threads here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
