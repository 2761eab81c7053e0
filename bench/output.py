"""What every section shares and needs no torch for: the cache directory and text tables."""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("CTR_BENCH_CACHE", ".bench-cache"))


def print_table(title: str, rows: list[dict]) -> None:
    """Prints ``rows`` (dicts sharing keys) as an aligned text table."""
    print(f"\n== {title} ==")
    if not rows:
        print("(no rows)")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, in order
    cells = [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e3 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)
