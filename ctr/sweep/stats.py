"""The statistics of a sweep report: rows grouped by dataset and model, seed means and
spreads, the verdicts (a win only beyond the seed noise) and the Pareto front."""

from __future__ import annotations

import math
import statistics
from typing import Any

Groups = dict[tuple[str, str], dict[tuple[str, str], list]]


def ratio_order(row: dict[str, Any]) -> float:
    return row["ratio"] if row["ratio"] is not None else math.inf


def groups(rows: list[dict[str, Any]]) -> Groups:
    """(data, model) -> (method, budget) -> finished rows."""
    out: dict[tuple[str, str], dict[tuple[str, str], list]] = {}
    for r in rows:
        cells = out.setdefault((r["data"], r["model"]), {})
        cells.setdefault((r["method"], r["budget"]), []).append(r)
    return out


def seed_stats(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    aucs = [r["test_auc"] for r in rows if r["status"] == "done"]
    if not aucs:
        return None
    return {
        "mean": statistics.fmean(aucs),
        "std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
        "spread": max(aucs) - min(aucs),
        "n": len(aucs),
        "bytes": statistics.fmean(r["serve_bytes"] for r in rows if r["status"] == "done"),
    }


def best_per_budget(cells: dict[tuple[str, str], list]) -> dict[str, str]:
    """budget -> "method (win)" / "tie: a, b" (a win only beyond either's seed spread)."""
    verdicts = {}
    for budget in dict.fromkeys(b for _, b in cells):
        ranked = sorted(
            ((s, m) for (m, b), rows in cells.items() if b == budget and (s := seed_stats(rows))),
            key=lambda x: -x[0]["mean"],
        )
        if not ranked:
            verdicts[budget] = "none feasible"
        elif len(ranked) == 1:
            verdicts[budget] = f"{ranked[0][1]} (only one)"
        else:
            (best, name), (second, other) = ranked[0], ranked[1]
            margin = best["mean"] - second["mean"]
            if margin > max(best["spread"], second["spread"]) and min(best["n"], second["n"]) > 1:
                verdicts[budget] = f"**{name}** (+{margin:.4f} over {other})"
            else:
                ties = [
                    m for s, m in ranked if best["mean"] - s["mean"] <= best["spread"] + s["spread"]
                ]
                verdicts[budget] = f"tie within seed spread: {', '.join(ties)}"
    return verdicts


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    """``"above"``, ``"below"`` or ``"tie"``: ``a``'s test AUCs against ``b``'s, a difference
    only beyond the seed noise read both ways — paired by seed (every per-seed gain of one
    sign and their mean beyond their spread) and unpaired (the means differ by more than
    both sides' standard deviations together). Fewer than 3 shared seeds: ``"tie"``."""
    by_seed_a = {r["seed"]: r["test_auc"] for r in a if r["status"] == "done"}
    by_seed_b = {r["seed"]: r["test_auc"] for r in b if r["status"] == "done"}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if len(seeds) < 3:
        return "tie"
    xa = [by_seed_a[k] for k in seeds]
    xb = [by_seed_b[k] for k in seeds]
    gains = [x - y for x, y in zip(xa, xb, strict=True)]
    noise = statistics.pstdev(xa) + statistics.pstdev(xb)
    mean = statistics.fmean(gains)
    spread = max(gains) - min(gains)
    if min(gains) > 0 and mean > spread and mean > noise:
        return "above"
    if max(gains) < 0 and -mean > spread and -mean > noise:
        return "below"
    return "tie"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bytes, auc) points no other point beats with fewer or equal bytes."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front
