"""The method catalogue for ``ctr methods``: names, one-line summaries and typed options.

Listing methods should not cost torch's import, so the catalogue is kept as JSON beside this
module (``catalog.json``, a cache of what the registry says) and read without importing
``compressors``. When any module of the package is newer than the file, :func:`catalog`
rebuilds it from the registry (importing everything) and rewrites it where it may. A test
keeps the committed file in sync; ``python -m compressors.catalog`` rewrites it.

Example::

    from compressors.catalog import catalog
    catalog()["hash"]["options"][0]   # {'name': 'shared', 'type': 'bool', 'default': False, ...}
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

CATALOG_FILE = Path(__file__).with_name("catalog.json")


def build_catalog() -> dict[str, Any]:
    """The catalogue from the registry (imports every method)."""
    from compressors.core.registry import COMPRESSORS, option_spec

    out = {}
    for name in sorted(COMPRESSORS):
        out[name] = {
            "summary": summary(COMPRESSORS[name]),
            "options": [s.to_json() for s in option_spec(name)],
        }
    return out


def summary(cls: type) -> str:
    """One whole sentence for ``ctr methods``: the class docstring's first sentence (without
    pointers to the module docstring, which the listing cannot show), or, when that says
    little, the title line of the method's module ("name — what it is"). Never the
    first *line* of a wrapped paragraph, never empty."""
    doc = " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())
    first = re.split(r"(?<=\.)\s+", doc)[0] if doc else ""
    first = re.sub(r"\s*\((see )?(the )?module docstring\)", "", first).strip()
    if len(first) >= 30:
        return first
    module = inspect.cleandoc(sys.modules[cls.__module__].__doc__ or "")
    head = " ".join(module.split("\n\n")[0].split())
    if head.startswith("``") and " — " in head:
        text = head.split(" — ", 1)[1]
        return text[:1].upper() + text[1:]
    return first or head or cls.__name__


def _stale() -> bool:
    if not CATALOG_FILE.exists():
        return True
    written = CATALOG_FILE.stat().st_mtime
    root = CATALOG_FILE.parent
    return any(p.stat().st_mtime > written for p in root.rglob("*.py"))


def catalog() -> dict[str, Any]:
    """The catalogue: from ``catalog.json`` when it is current, else rebuilt (and saved)."""
    if not _stale():
        return json.loads(CATALOG_FILE.read_text())
    fresh = build_catalog()
    write_catalog(fresh)
    return fresh


def write_catalog(entries: dict[str, Any]) -> None:
    """Saves the catalogue atomically; a read-only install keeps rebuilding instead."""
    tmp = CATALOG_FILE.with_name(f".{CATALOG_FILE.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(entries, indent=1, default=repr) + "\n")
        os.replace(tmp, CATALOG_FILE)
    except OSError:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    write_catalog(build_catalog())
    print(f"wrote {CATALOG_FILE}")
