"""Per-field tables of a sweep's searched methods against the synthetic teacher's planted
signal (fields C1, C5, ... strong; C2, C6, ... weak; C3, ... faint; C4, ... none).

    python -m scripts.field_tables SWEEP --meta DATA/meta.json [--method optembed|dnis]
                                   [--budget 2x ...]

Options:
    SWEEP       a sweep directory (``cells/<cell>/result.json``).
    --meta      the prepared data's ``meta.json`` (field cardinalities), e.g. that of
                ``ctr synth --rows 200000 --out DATA``.
    --method    ``optembed``: rows kept by the supernet and after the budget fill, mean dim,
                from each result's hyperparameters (the results archive suffices);
                ``dnis``: mean entries kept per row by frequency block, from the chosen grid
                point's trained model (``cells/<cell>/p<i>/``: the sweep directory itself, not
                the archive). Default: both.
    --budget    budgets to tabulate (default 2x and 10x).

Markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PATTERN = (1.0, 0.5, 0.2, 0.0)
NAMES = {1.0: "strong", 0.5: "weak", 0.2: "faint", 0.0: "none"}


def strength(name: str) -> float:
    """The planted signal of synthetic field ``C<i>`` (the teacher cycles through PATTERN)."""
    return PATTERN[(int(name[1:]) - 1) % len(PATTERN)]


def _results(sweep: Path, method: str, budget: str) -> list[Path]:
    return sorted((sweep / "cells").glob(f"{method}-{budget}-*/result.json"))


def optembed(sweep: Path, budget: str, cardinality: dict[str, int]) -> list[str]:
    rows = [json.loads(p.read_text()) for p in _results(sweep, "optembed", budget)]
    rows = [r["hyperparameters"] for r in rows if r.get("status") == "done"]
    if not rows:
        return []
    lines = [
        f"### optembed @ {budget}: {len(rows)} seed(s)",
        "",
        "| signal | fields | rows | supernet kept | after fill | dim (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for level in PATTERN:
        names = [n for n in rows[0]["dims"] if strength(n) == level]
        total = sum(cardinality[n] for n in names)
        supernet = np.mean(
            [sum(h.get("supernet_kept_rows", h["kept_rows"])[n] for n in names) for h in rows]
        )
        kept = np.mean([sum(h["kept_rows"][n] for n in names) for h in rows])
        dims = np.mean([np.mean([h["dims"][n] for n in names]) for h in rows])
        lines.append(
            f"| {NAMES[level]} | {len(names)} | {total} | {supernet:.0f} "
            f"({100 * supernet / total:.0f}%) | {kept:.0f} ({100 * kept / total:.0f}%) "
            f"| {dims:.1f} |"
        )
    return lines + [""]


def dnis(sweep: Path, budget: str) -> list[str]:
    from ctr import load_run_model

    paths = _results(sweep, "dnis", budget)
    if not paths:
        return []
    per: dict[float, list[list[float]]] = {}
    for path in paths:
        result = json.loads(path.read_text())
        if result.get("status") != "done":
            continue
        best = max(range(len(result["grid"])), key=lambda i: result["grid"][i]["valid_auc"])
        run = path.parent / f"p{best}"
        if not (run / "config.json").is_file():
            raise SystemExit(
                f"{run}: no trained run (a results archive keeps cell.json and result.json "
                "only); give the sweep directory the cells trained in"
            )
        model, _ = load_run_model(run)
        for name, blocks in model.embedding.compressor.kept_dims().items():
            per.setdefault(strength(name), []).append([b["entries_per_row"] for b in blocks[1:]])
    lines = [
        f"### dnis @ {budget}: {len(paths)} seed(s); entries kept per row, "
        "by frequency block (head -> tail)",
        "",
        "| signal | head block | 2nd | ... | tail block | mean |",
        "|---|---|---|---|---|---|",
    ]
    for level in PATTERN:
        lists = [b for b in per.get(level, []) if b]
        head = np.mean([b[0] for b in lists])
        second = np.mean([b[1] for b in lists if len(b) > 1])
        tail = np.mean([b[-1] for b in lists])
        mean = np.mean([np.mean(b) for b in lists])
        lines.append(f"| {NAMES[level]} | {head:.2f} | {second:.2f} | | {tail:.2f} | {mean:.2f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.field_tables",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", type=Path, metavar="SWEEP")
    parser.add_argument("--meta", type=Path, required=True, help="the data's meta.json")
    parser.add_argument("--method", choices=("optembed", "dnis"), action="append")
    parser.add_argument("--budget", action="append", help="default: 2x and 10x")
    args = parser.parse_args(argv)
    if not (args.sweep / "cells").is_dir():
        parser.error(f"{args.sweep}: not a sweep directory (no cells/)")
    try:
        meta = json.loads(args.meta.read_text())
        cardinality = {s["name"]: s["cardinality"] for s in meta["sparse"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"--meta {args.meta}: expected a prepared data's meta.json ({e})")
    lines: list[str] = []
    for budget in args.budget or ["2x", "10x"]:
        for method in args.method or ["optembed", "dnis"]:
            if method == "optembed":
                lines += optembed(args.sweep, budget, cardinality)
            else:
                lines += dnis(args.sweep, budget)
    print("\n".join(lines) if lines else f"{args.sweep}: no optembed or dnis cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
