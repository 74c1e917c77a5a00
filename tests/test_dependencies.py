"""The declared dependencies are exactly what the packages import.

A plain ``pip install .`` must be able to serve: every third-party module that model/, memory/,
streamer/ and sinks/ import is provided by a declared dependency (or, for GPU-only code, by an
optional extra), and every declared dependency is imported somewhere.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "memory", "streamer", "sinks")
# Modules a declared distribution brings along as part of its own API.
PART_OF = {"pydantic_core": "pydantic"}
# Data-only distributions a standard-library module reads when it is imported.
READ_BY_STDLIB = {"tzdata": "zoneinfo"}


def _project() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def imported_modules(*, stdlib: bool = False) -> set[str]:
    """Top-level third-party modules the packages import (our own left out; the standard
    library's too unless ``stdlib``)."""
    found: set[str] = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    found -= set(PACKAGES) | {"__future__"}
    return found if stdlib else found - set(sys.stdlib_module_names)


@cache
def _installed() -> dict[str, list[str]]:
    return packages_distributions()


def _providers(module: str) -> set[str]:
    """Distributions that provide ``module``; one not installed (a GPU-only extra such as
    flash_attn) is known by its own name."""
    dists = _installed().get(module) or [module]
    return {d.lower().replace("_", "-") for d in dists} | (
        {PART_OF[module]} if module in PART_OF else set()
    )


def test_every_import_is_declared() -> None:
    project = _project()
    declared = _names(project["dependencies"])  # type: ignore[arg-type]
    extras = project["optional-dependencies"]  # type: ignore[index]
    optional = {name for group in extras.values() for name in _names(group)}  # type: ignore[attr-defined]
    undeclared = {m for m in imported_modules() if not _providers(m) & (declared | optional)}
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"


def test_every_dependency_is_imported() -> None:
    declared = _names(_project()["dependencies"])  # type: ignore[arg-type]
    provided = set().union(*(_providers(m) for m in imported_modules()))
    stdlib = imported_modules(stdlib=True)
    provided |= {dist for dist, module in READ_BY_STDLIB.items() if module in stdlib}
    unused = declared - provided
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
