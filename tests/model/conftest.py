"""Golden folders: every folder under tests/data/golden/ plus FLASHWATCH_GOLDEN_DIRS.

A golden folder holds ``checkpoint/`` (official format), ``golden.safetensors`` (inputs and the
official outputs) and ``golden_meta.json``; see ``tests/data/golden/FORMAT.md``.
The folders are reference data produced by the official implementation, kept in the repository so
that a clone is self-sufficient.
"""

from __future__ import annotations

import json
import os
import re
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

    def has(self, pattern: str) -> bool:
        """Whether some tensor name matches ``pattern`` (a regular expression, whole name)."""
        return any(re.fullmatch(pattern, name) for name in self.tensors)

    def require(self, *names: str) -> dict[str, torch.Tensor]:
        """The named tensors (a test is only collected for folders that have them)."""
        tensors = self.tensors
        missing = [n for n in names if n not in tensors]
        assert not missing, f"{self.name}: golden folder has no {', '.join(missing)}"
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "golden_needs(*patterns): collect the test only for golden folders with a tensor "
        "matching each pattern (regular expressions over tensor names)",
    )
    config.addinivalue_line(
        "markers",
        "golden_cases(template, values): parametrise ``golden_case`` over (folder, value) pairs "
        "whose folder has a tensor matching template.format(value)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise any test that takes ``golden`` over the golden folders that can feed it.

    A test states the tensors it reads with ``@pytest.mark.golden_needs(...)``; it is collected
    once per folder that has them, so a check never skips: it runs where the data exists and is
    not generated where it does not (FORMAT.md: the checks are driven by the folder).
    """
    if "golden_case" in metafunc.fixturenames:
        _parametrize_cases(metafunc)
    if "golden" not in metafunc.fixturenames:
        return
    patterns = [p for mark in metafunc.definition.iter_markers("golden_needs") for p in mark.args]
    folders = [f for f in golden_folders() if all(f.has(p) for p in patterns)]
    if not folders:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: no golden folder has {patterns}; "
            "feed the test (add a folder with these tensors) or remove it"
        )
    metafunc.parametrize("golden", folders, ids=[f.name for f in folders])


def _parametrize_cases(metafunc: pytest.Metafunc) -> None:
    """``golden_case`` = (folder, value) for each value of ``golden_cases(template, values)``
    whose tensor (``template.format(value)``, a pattern) the folder has."""
    (mark,) = metafunc.definition.iter_markers("golden_cases")
    template, values = mark.args
    cases = [(f, v) for f in golden_folders() for v in values if f.has(template.format(v))]
    if not cases:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: no golden folder has {template}")
    metafunc.parametrize("golden_case", cases, ids=[f"{f.name}-{v}" for f, v in cases])


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
