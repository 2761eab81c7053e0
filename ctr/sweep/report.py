"""The report of a sweep directory: a table, a markdown summary and a Pareto plot.

``results.csv`` / ``results.parquet`` hold one row per cell (infeasible ones included, with
the reason). ``summary.md`` has, per dataset and model, a method × budget table of test AUC
mean ± std over seeds and the best method per budget — a *win* only when the best mean beats
the runner-up by more than either's seed spread (max − min), otherwise a tie is reported.
``pareto.png`` plots test AUC against serve bytes (log x): one line per method with seed error
bars, the Pareto front marked, tuned ``full`` and the synthetic teacher's AUC as horizontal
lines.

A method run with non-default options is its own row, labelled with them
(``pep[threshold_lr=0.1]``): cells of one method under two option sets are never averaged.
Several sweep directories report as one. A cell is counted once however many directories
(or keys: a version whose unused protocol defaults differed) hold it — by what it trains.

Example::

    paths = write_report("sweeps/synth")  # {"csv": .., "parquet": .., "markdown": .., "png": [..]}
    paths = write_report(["sweeps/a", "sweeps/b"], "sweeps/report")
"""

from __future__ import annotations

import collections
import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctr.sweep.plot import pareto_plot
from ctr.sweep.spec import CELL_FILE, RESULT_FILE, Cell, CellResult
from ctr.sweep.stats import best_per_budget, compare, groups, ratio_order, seed_stats
from datasets.io import atomic_write_text

COLUMNS = (
    "data",
    "model",
    "method",
    "budget",
    "seed",
    "status",
    "serve_bytes",
    "train_bytes",
    "full_bytes",
    "ratio",
    "test_auc",
    "test_logloss",
    "valid_auc",
    "table_lr",
    "embedding_l2",
    "batch_size",
    "steps",
    "train_seconds",
    "cell_seconds",
    "samples_per_sec",
    "hyperparameters",
    "teacher_test_auc",
    "reason",
    "method_options",
    "key",
    "code_version",
)


def load_results(out: str | Path) -> list[CellResult]:
    """Every finished cell's result under ``out`` (any spec that wrote there), each with its
    ``cell.json`` attached (``result.cell``), so that one method run with two option sets is
    never read as one, and cells are counted by what they train (``Cell.effective_key``)."""
    paths = sorted((Path(out) / "cells").glob(f"*/{RESULT_FILE}"))
    if not paths:
        raise ValueError(f"{out}: no finished cells (cells/*/{RESULT_FILE}); run `ctr sweep run`")
    results = []
    for path in paths:
        result = CellResult.load(path)
        cell = path.with_name(CELL_FILE)
        if cell.exists():
            result.cell = Cell.from_json(json.loads(cell.read_text()))
        results.append(result)
    return results


def variant(method: str, options: dict[str, Any] | None) -> str:
    """``method`` with its non-default options, e.g. ``pep[threshold_lr=0.1]``."""
    if not options:
        return method
    return f"{method}[{','.join(f'{k}={options[k]}' for k in sorted(options))}]"


def protocol_suffix(protocol: dict[str, Any] | None, common: dict[str, Any] | None) -> str:
    """``{epochs=6.0}``: the protocol fields in which a cell differs from the report's most
    common protocol, so cells trained under two protocols never average into one row."""
    if protocol is None or common is None or protocol == common:
        return ""
    parts = []
    for k in sorted(set(protocol) | set(common)):
        value = protocol.get(k)
        if value != common.get(k):
            shown = f"{len(value)} points" if k == "grid" and isinstance(value, list) else value
            parts.append(f"{k}={shown}")
    return "{" + ",".join(parts) + "}"


def learns_on_validation(method: str, options: dict[str, Any] | None = None) -> bool:
    """Whether ``method`` run with ``options`` fits parameters on validation batches (not
    with ``search_holdout``, which takes them from held-out training rows; unknown names:
    False)."""
    from compressors.core.registry import COMPRESSORS

    cls = COMPRESSORS.get(method)
    held_out = bool((options or {}).get("search_holdout"))
    return bool(cls is not None and cls.learns_on_validation and not held_out)


VALIDATION_NOTE = (
    "† learns architecture weights on the validation split (a bilevel search, as its paper "
    "does): that split is training data to it, its validation AUC is not held out, and a "
    "gain over methods that never see it may be that data."
)


def _protocol(result: CellResult) -> dict[str, Any] | None:
    return result.cell.protocol.effective() if result.cell is not None else None


def _common_protocol(results: list[CellResult]) -> dict[str, Any] | None:
    spelled = [json.dumps(p, sort_keys=True) for r in results if (p := _protocol(r))]
    if not spelled:
        return None
    return json.loads(collections.Counter(spelled).most_common(1)[0][0])


def result_rows(results: list[CellResult]) -> list[dict[str, Any]]:
    """One row of :data:`COLUMNS` (and ``learns_on_validation``) per result."""
    rows = []
    common = _common_protocol(results)
    for r in results:
        raw = r.to_json()
        row = {k: raw.get(k) for k in COLUMNS}
        row["method"] = variant(r.method, r.method_options) + protocol_suffix(_protocol(r), common)
        row["learns_on_validation"] = learns_on_validation(r.method, r.method_options)
        row["method_options"] = str(r.method_options or "")
        row["budget"] = str(r.budget)
        row["table_lr"] = r.chosen.get("table_lr")
        row["embedding_l2"] = r.chosen.get("embedding_l2")
        row["hyperparameters"] = str(r.summary.get("hyperparameters") or "")
        rows.append(row)
    rows.sort(key=lambda x: (x["data"], x["model"], x["method"], ratio_order(x), x["seed"]))
    return rows


def against_full(cells: dict[tuple[str, str], list]) -> list[str]:
    """Markdown lines: each compressed (method, budget) against tuned ``full`` at 1x."""
    full = cells.get(("full", "1x"))
    if not full:
        return []
    words = {"above": "**above full**", "below": "below full", "tie": "tie with full"}
    lines = [
        "Against tuned full at 1x (≥ 3 shared seeds; a difference only beyond the seed noise, "
        "paired by seed and unpaired):",
        "",
    ]
    reference = seed_stats(full)
    for (method, budget), rows in cells.items():
        s = seed_stats(rows)
        if method == "full" or s is None or reference is None:
            continue
        verdict = compare(rows, full) if s["n"] >= 3 else f"undecided ({s['n']} seed(s))"
        verdict = words.get(verdict, verdict)
        mark = " †" if rows[0].get("learns_on_validation") else ""
        lines.append(
            f"- {method}{mark} @ {budget}: {s['mean'] - reference['mean']:+.4f} → {verdict}"
        )
    return lines + [""]


def cost_lines(cells: dict[tuple[str, str], list]) -> list[str]:
    """Markdown lines: cells trained, and per method the mean seconds a cell took."""
    done = [r for rs in cells.values() for r in rs if r["status"] == "done"]
    if not done:
        return []
    total = sum(r.get("cell_seconds") or 0.0 for r in done)
    lines = [
        f"Cost: {len(done)} cells trained in {total / 3600:.2f} h of cell time "
        "(every grid point of a cell included). Mean seconds per cell:",
        "",
    ]
    per_method: dict[str, list[float]] = {}
    for r in done:
        per_method.setdefault(r["method"], []).append(r.get("cell_seconds") or 0.0)
    lines.append(", ".join(f"{m} {statistics.fmean(v):.0f}" for m, v in per_method.items()))
    return lines + [""]


def markdown_summary(rows: list[dict[str, Any]]) -> str:
    lines = ["# Sweep summary", ""]
    for (data, model), cells in groups(rows).items():
        budgets = sorted(
            dict.fromkeys(b for _, b in cells),
            key=lambda b: min(
                ratio_order(r) for (_, bb), rs in cells.items() if bb == b for r in rs
            ),
        )
        methods = list(dict.fromkeys(m for m, _ in cells))
        teacher = next((r["teacher_test_auc"] for r in rows if r["teacher_test_auc"]), None)
        lines += [f"## {model} on {data}", ""]
        if teacher:
            lines += [f"Teacher test AUC (ceiling): {teacher:.4f}", ""]
        lines += ["Test AUC, mean ± std over seeds (n); — = budget not reachable.", ""]
        lines.append("| method | " + " | ".join(budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        flagged = {
            m for (m, _), rs in cells.items() if any(r.get("learns_on_validation") for r in rs)
        }
        for m in methods:
            cellstr = []
            for b in budgets:
                rs = cells.get((m, b))
                s = seed_stats(rs) if rs else None
                if rs is None:
                    cellstr.append("")
                elif s is None:
                    cellstr.append("—")
                else:
                    cellstr.append(f"{s['mean']:.4f} ± {s['std']:.4f} ({s['n']})")
            mark = " †" if m in flagged else ""
            lines.append(f"| {m}{mark} | " + " | ".join(cellstr) + " |")
        if flagged:
            lines += ["", VALIDATION_NOTE]
        lines += ["", "Best per budget (a win only beyond the seed spread):", ""]
        for budget, verdict in best_per_budget(cells).items():
            lines.append(f"- {budget}: {verdict}")
        lines.append("")
        lines += against_full(cells)
        lines += cost_lines(cells)
        infeasible = sorted(
            {
                (r["method"], r["budget"], r["reason"])
                for rs in cells.values()
                for r in rs
                if r["status"] != "done"
            }
        )
        if infeasible:
            lines += ["", "Not reachable:", ""]
            lines += [f"- {m} @ {b}: {reason}" for m, b, reason in infeasible]
        lines.append("")
    return "\n".join(lines)


REPORT_MARKER = ".ctr-sweep-report"
REPORT_NAME = re.compile(r"results\.csv|results\.parquet|summary\.md|pareto(-\d+)?\.png")


def is_report(path: Path) -> bool:
    """Whether directory ``path`` holds an earlier report and nothing else."""
    return (path / REPORT_MARKER).is_file() and all(
        p.name == REPORT_MARKER or (REPORT_NAME.fullmatch(p.name) and p.is_file())
        for p in path.iterdir()
    )


def write_report(
    sweep: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes results.csv, results.parquet, summary.md and pareto[-i].png of one sweep
    directory or several (``out`` then required); returns the paths.

    The report is built beside ``out`` and renamed into place (``datasets.io``): ``out``
    must be new, empty or an earlier report, replaced only with ``overwrite``; a sweep's own
    ``report/`` folder (the default) is regenerated. Nothing is created when a sweep holds no
    results."""
    import pandas as pd

    from datasets.io import check_output_dir, replace_dir

    sweeps = [Path(sweep)] if isinstance(sweep, str | Path) else [Path(s) for s in sweep]
    if out is None and len(sweeps) != 1:
        raise ValueError("a report of several sweep directories needs --out")
    owned = out is None
    out = Path(out) if out else sweeps[0] / "report"
    replace = overwrite or owned
    check_output_dir(out, "sweep report", is_report, replace)  # refused before reading
    results, seen = [], set()
    for directory in sweeps:
        for result in load_results(directory):
            key = result.cell.effective_key if result.cell is not None else result.key
            if key not in seen:
                seen.add(key)
                results.append(result)
    rows = result_rows(results)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    keys = list(groups(rows))
    pngs = ["pareto.png"] if len(keys) == 1 else [f"pareto-{i}.png" for i in range(len(keys))]
    with replace_dir(out, "sweep report", is_report, replace) as staging:
        (staging / REPORT_MARKER).touch()
        frame.to_csv(staging / "results.csv", index=False)
        frame.to_parquet(staging / "results.parquet", index=False)
        atomic_write_text(staging / "summary.md", markdown_summary(rows))
        for name, (data, model) in zip(pngs, keys, strict=True):
            subset = [r for r in rows if (r["data"], r["model"]) == (data, model)]
            pareto_plot(subset, staging / name, f"{model} on {Path(data).name}")
    return {
        "csv": out / "results.csv",
        "parquet": out / "results.parquet",
        "markdown": out / "summary.md",
        "png": [out / name for name in pngs],
    }
