"""Imports run one way, floor by floor, with no circle.

::

    ctr.cli  →  ctr.sweep  →  ctr.training | ctr.serving  →  ctr.models, ctr.embedding
             →  compressors, datasets

A module imports only from its own floor or the floors below it; ``compressors/`` and
``datasets/`` import nothing from ``ctr/``. The public facades (``ctr/__init__.py``) and the
one-release shims at old paths (docstring "Moved to ...") stand outside the floors, and no
module of the repository imports a shim: shims are for users' code only.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("ctr", "compressors", "datasets")
FLOORS = {
    "compressors": 0,
    "datasets": 0,
    "ctr.embedding": 1,
    "ctr.models": 1,
    "ctr.training": 2,
    "ctr.serving": 2,
    "ctr.sweep": 3,
    "ctr.cli": 4,
}
FACADES = {"ctr"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[_name(path)] = (path, ast.parse(path.read_text()))
    return out


MODULES = _modules()
SHIMS = {
    name
    for name, (_, tree) in MODULES.items()
    if (ast.get_docstring(tree) or "").startswith("Moved to")
}


def _floor(module: str) -> int | None:
    for prefix in sorted(FLOORS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return FLOORS[prefix]
    return None


def _targets(tree: ast.Module, top_level_only: bool = False) -> set[str]:
    """First-party modules ``tree`` imports (``from a import b`` is ``a.b`` when that is a
    module)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _ours() -> list[str]:
    return [m for m in MODULES if m not in SHIMS and m not in FACADES]


def test_no_module_imports_from_a_floor_above_its_own():
    climbs = []
    for name in _ours():
        floor = _floor(name)
        if floor is None:
            continue
        for target in _targets(MODULES[name][1]):
            if target in FACADES:
                climbs.append(f"{name} imports the facade {target} (import the module itself)")
            elif (above := _floor(target)) is not None and above > floor:
                climbs.append(f"{name} (floor {floor}) imports {target} (floor {above})")
    assert not climbs, "\n".join(climbs)


def test_no_module_of_the_repository_imports_a_one_release_shim():
    users = [
        f"{name} imports {target}"
        for name in _ours()
        for target in _targets(MODULES[name][1])
        if target in SHIMS
    ]
    assert not users, "\n".join(users)


def test_no_import_circle_at_import_time():
    graph = {
        name: {t for t in _targets(MODULES[name][1], top_level_only=True) if t in MODULES}
        for name in MODULES
    }
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                circles.append(" → ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)


def test_the_floors_check_bites():
    # A compressor importing the trainer would climb three floors: the rule must see it.
    tree = ast.parse("from ctr.training.trainer import Trainer\n")
    assert _floor("compressors.core.base") == 0
    assert {_floor(t) for t in _targets(tree)} == {2}
