"""``datasets/`` imports run one way: ``encode -> readers -> prepare -> prepared, io, ...``.

The engine never imports a reader (only the one-release shims at the old paths do, which
say "Moved to" first), no reader imports the serving encoder, and nothing in ``datasets/``
imports ``ctr``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT as REPO

ROOT = REPO / "datasets"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _is_shim(path: Path) -> bool:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.startswith("Moved to")


def _modules(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*.py")) if not _is_shim(p)]


def test_the_engine_imports_no_reader_and_readers_no_encoder():
    for path in _modules(ROOT / "prepare"):
        if path.name == "__init__.py":
            continue  # its old names resolve lazily, on first use (one release)
        up = {m for m in _imports(path) if m.startswith(("datasets.readers", "datasets.encode"))}
        assert not up, f"{path} imports {sorted(up)}"
    for path in _modules(ROOT / "readers"):
        assert "datasets.encode" not in _imports(path), path


def test_datasets_imports_nothing_from_ctr():
    for path in sorted(ROOT.rglob("*.py")):
        ctr = {m for m in _imports(path) if m == "ctr" or m.startswith("ctr.")}
        assert not ctr, f"{path} imports {sorted(ctr)}"


def test_importing_the_engine_loads_no_reader():
    code = (
        "import sys, datasets.prepare, datasets.prepare.engine\n"
        "print(sorted(m for m in sys.modules if m.startswith('datasets.readers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
