"""The installed console commands and the layering rules of ARCHITECTURE.md."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> project packages it must never import
FORBIDDEN = {
    "spn": {"datamodules", "lightning_modules", "experiments", "pytorch_lightning", "lightning"},
    "datamodules": {"spn", "lightning_modules", "experiments"},
    "lightning_modules": {"datamodules", "experiments"},
}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_top_levels(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_mammospn_lists_its_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "experiments.tools", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("synth", "preview", "table1"):
        assert name in out
