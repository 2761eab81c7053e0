"""The report's Pareto plot: test AUC against serve bytes, one line per method.

Example::

    pareto_plot(result_rows(results), Path("pareto.png"), "deepfm on synth")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctr.sweep.stats import groups, pareto_front, seed_stats
from datasets.io import atomic_write


def pareto_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = groups(rows)
    fig, ax = plt.subplots(figsize=(10, 6))
    points = []
    full = None
    methods = list(dict.fromkeys(m for group in cells.values() for m, _ in group))
    # Twenty distinct colours and a marker cycle: a sweep of every method stays readable.
    colours = plt.get_cmap("tab20").colors
    markers = "os^vD<>ph*"
    for group in cells.values():
        for method in dict.fromkeys(m for m, _ in group):
            stats = sorted(
                (s for (m, _), rs in group.items() if m == method and (s := seed_stats(rs))),
                key=lambda s: s["bytes"],
            )
            if not stats:
                continue
            if method == "full":
                full = stats[-1]
            x = [s["bytes"] for s in stats]
            y = [s["mean"] for s in stats]
            err = [s["std"] for s in stats]
            i = methods.index(method)
            ax.errorbar(
                x,
                y,
                yerr=err,
                marker=markers[i % len(markers)],
                color=colours[i % len(colours)],
                capsize=3,
                label=method,
            )
            points += list(zip(x, y, strict=True))
    front = pareto_front(points)
    if front:
        fx, fy = zip(*front, strict=True)
        ax.plot(fx, fy, linestyle="--", color="grey", zorder=0, label="Pareto front")
        ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="black", zorder=4)
    if full is not None:
        ax.axhline(
            full["mean"], color="black", linestyle=":", label=f"tuned full {full['mean']:.4f}"
        )
    teacher = next((r["teacher_test_auc"] for r in rows if r["teacher_test_auc"]), None)
    if teacher:
        ax.axhline(teacher, color="red", linestyle="-.", label=f"teacher {teacher:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("serve bytes of the embeddings (log)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
