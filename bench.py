"""Sweeps and performance benchmarks, each reported as ratios measured side by side in one run.

``python bench.py`` runs the quick default sections; ``python bench.py --only preprocess``
runs named ones; ``python bench.py --list`` lists them. Every section prints a table and writes
its figures to ``.bench-cache/results/<section>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

CACHE = Path(os.environ.get("CTR_BENCH_CACHE", ".bench-cache"))
SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], dict], bool]] = {}


def section(name: str, default: bool = True) -> Callable:
    """Registers a benchmark section; ``default`` sections run when no ``--only`` is given."""

    def register(fn: Callable[[argparse.Namespace], dict]) -> Callable[[argparse.Namespace], dict]:
        SECTIONS[name] = (fn, default)
        return fn

    return register


def print_table(title: str, rows: list[dict]) -> None:
    """Prints ``rows`` (dicts sharing keys) as an aligned text table."""
    print(f"\n== {title} ==")
    if not rows:
        print("(no rows)")
        return
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated sections to run")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    parser.add_argument("--rows", type=int, default=None, help="override dataset rows where a section uses them")
    args = parser.parse_args(argv)
    if args.list:
        for name, (fn, default) in SECTIONS.items():
            print(f"{name:14s} {'(default) ' if default else ''}{(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    names = [n for n in args.only.split(",") if n] or [n for n, (_, d) in SECTIONS.items() if d]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {sorted(SECTIONS)}")
    (CACHE / "results").mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        result = SECTIONS[name][0](args)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        path = CACHE / "results" / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, path)
        print(f"[{name}] done in {result['wall_s']} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
