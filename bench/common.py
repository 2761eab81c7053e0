"""What every bench section shares: the cache directory, the default synthetic data, cached
training runs and protocol sweeps, result tables and files, and timing helpers."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.output import CACHE, fmt, print_table  # noqa: F401 (the sections import them here)
from ctr.sweep import Cell, SweepSpec, feasibility, run_sweep
from ctr.sweep.report import write_report
from ctr.training.run import RunConfig, train_run
from ctr.training.trainer import TrainConfig
from datasets.io import atomic_write_text
from datasets.synthetic import SyntheticConfig, generate_synthetic

ROOT = Path(__file__).resolve().parent.parent  # the repository: bench.py's folder


DEFAULT_ROWS = 1_000_000


def default_dataset(args: argparse.Namespace, rows: int | None = None, **config: object) -> Path:
    """The default synthetic dataset (Criteo profile at scale 0.01), generated once and cached."""
    rows = rows or getattr(args, "rows", None) or DEFAULT_ROWS
    config.setdefault("min_count", 10)  # as `ctr synth` and Criteo preparation
    cfg = SyntheticConfig(rows=rows, **config)
    key = "-".join(f"{k}{v}" for k, v in sorted(config.items()))
    path = CACHE / "data" / f"synth-{rows}{'-' + key if key else ''}"
    if not (path / "meta.json").exists():
        print(f"generating {path} ...")
        generate_synthetic(path, cfg, progress=True)
    return path


def cached_run(name: str, **run: object) -> dict:
    """Trains ``RunConfig(**run)`` under .bench-cache/runs/NAME, reusing a finished summary.

    Interrupted sweeps resume: finished runs are skipped, a half-trained one continues from
    its checkpoint.
    """
    train = run.pop("train", {})
    cfg = RunConfig(**run, train=TrainConfig(progress=False, **train))
    run_dir = CACHE / "runs" / name
    summary_path = run_dir / "summary.json"
    config_path = run_dir / "config.json"
    if summary_path.exists() and json.loads(config_path.read_text()) == json.loads(
        json.dumps(cfg.to_json())
    ):
        return json.loads(summary_path.read_text())
    if config_path.exists() and not summary_path.exists():
        print(f"  resuming {name}")
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"  training {name} ...", flush=True)
    return train_run(cfg, run_dir)


def protocol_sweep(name: str, args: argparse.Namespace, **spec: object) -> list[dict]:
    """Runs a :class:`ctr.sweep.SweepSpec` under .bench-cache/sweeps/NAME (resumable: finished
    cells are reused) and writes its report; returns the cells' results.

    The protocol comes from ``spec["protocol"]`` overridden by ``--grid-lrs``, ``--grid-l2s``
    and ``--sweep-epochs``; ``--workers`` runs cells in parallel processes.
    """
    protocol = dict(spec.pop("protocol", {}) or {})
    if getattr(args, "grid_lrs", None):
        protocol["table_lrs"] = [float(x) for x in args.grid_lrs.split(",")]
        protocol["grid"] = []
    if getattr(args, "grid_l2s", None):
        protocol["embedding_l2s"] = [float(x) for x in args.grid_l2s.split(",")]
        protocol["grid"] = []
    if getattr(args, "sweep_epochs", None):
        protocol["epochs"] = args.sweep_epochs
    if getattr(args, "grid_optimizers", None):
        protocol["optimizers"] = args.grid_optimizers.split(",")
        protocol["grid"] = []
    sweep = SweepSpec.from_json({**spec, "protocol": protocol}, name)
    out = CACHE / "sweeps" / name
    results = run_sweep(sweep, out, workers=getattr(args, "workers", 1) or 1)
    paths = write_report(out)
    print(f"  report: {paths['markdown']}, {paths['png'][0]}")
    return results


def seed_stats(results: list[dict], method: str, budget: str) -> dict | None:
    """Mean, spread and bytes of one method at one budget over its finished seeds."""
    aucs = [
        r["test_auc"]
        for r in results
        if r["method"] == method and str(r["budget"]) == budget and r["status"] == "done"
    ]
    if not aucs:
        return None
    size = next(
        r["serve_bytes"]
        for r in results
        if r["method"] == method and r["status"] == "done" and str(r["budget"]) == budget
    )
    return {
        "mean": sum(aucs) / len(aucs),
        "spread": max(aucs) - min(aucs),
        "aucs": aucs,
        "bytes": size,
    }


def timed_steps(step: Callable[[object], object], batches: list, repeats: int = 1) -> float:
    """Samples per second of ``step`` over ``batches`` (after one warm-up batch)."""
    step(batches[0])
    start = time.perf_counter()
    samples = 0
    for _ in range(repeats):
        for b in batches[1:]:
            step(b)
            samples += len(b.labels)
    return samples / (time.perf_counter() - start)


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std; the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def fits(data: str | Path, method: str, budget: str, **options: object) -> str | None:
    """None when ``method`` fits ``budget`` on ``data`` at dim 16, else why not: the sweep's
    own rule (:func:`ctr.sweep.feasibility`, the method's solver; nothing is built)."""
    cell = Cell.from_json(
        {
            "data": str(data),
            "method": method,
            "dim": 16,
            "budget": budget,
            "method_options": options,
        }
    )
    return feasibility(cell)


def staged_run(name: str, seed: int = 0, **run: object) -> dict:
    """:func:`cached_run` with the training seed ``seed``; its summary's ``stage_seconds``
    holds each stage's wall seconds (recorded by the trainer)."""
    train = {**run.pop("train", {}), "seed": seed}
    return cached_run(name, **run, train=train)


def write_result(name: str, result: dict) -> Path:
    """Writes a section's figures to .bench-cache/results/NAME.json (atomically)."""
    path = CACHE / "results" / f"{name}.json"
    return atomic_write_text(path, json.dumps(result, indent=2, default=str))
