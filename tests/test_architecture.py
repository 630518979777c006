"""One-way imports between the four installed packages, read from the source (no import needed).

pipeline may import everything; models (what a downstream consumer installs to load an encoder), streams
and monitoring import only themselves; every package may import the leaf `streamssl.streams.files`,
which imports nothing of ours.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAF = "streamssl.streams.files"
ALLOWED = {  # package -> the packages its modules may import (besides the leaf)
    "models": {"models"},
    "streams": {"streams"},
    "monitoring": {"monitoring"},
    "pipeline": {"pipeline", "models", "streams", "monitoring"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from … import` in `path` names (relative imports are not used here)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def _ours(path: Path) -> set[str]:
    return {module for module in imported_modules(path) if module.startswith("streamssl.")}


SOURCES = sorted(path for package in ALLOWED for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_the_packages_below_its_own(path: Path) -> None:
    package = path.relative_to(ROOT).parts[0]
    wrong = {module for module in _ours(path) - {LEAF} if module.split(".")[1] not in ALLOWED[package]}
    assert not wrong, f"{package} may not import {sorted(wrong)}"


def test_the_leaf_module_imports_nothing_of_ours() -> None:
    assert _ours(ROOT / "streams" / "files.py") == set()


def test_the_rule_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from streamssl.pipeline.config import Config\nimport streamssl.models.method\n")
    assert _ours(bad) == {"streamssl.pipeline.config", "streamssl.models.method"}


MODEL_FILE_LINES = 220  # a method file reads as its paper's training step; the rest goes to single-purpose modules


@pytest.mark.parametrize("path", sorted((ROOT / "models").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_models_file_stays_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MODEL_FILE_LINES, f"{path.relative_to(ROOT)} has {lines} lines, more than {MODEL_FILE_LINES}: split it"


SOURCE_FILE_LINES = 400  # a file a newcomer reads in one sitting; past it, split by concern


@pytest.mark.parametrize("path", sorted(p for package in ("pipeline", "streams", "models", "monitoring")
                                        for p in (ROOT / package).rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_source_file_stays_under_400_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= SOURCE_FILE_LINES, f"{path.relative_to(ROOT)} has {lines} lines, more than {SOURCE_FILE_LINES}: split it"
