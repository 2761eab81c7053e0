"""The ``scale`` bench section: every method's cost against the number of ids, up to millions.

Criteo-shaped synthetic data (``datasets.synthetic``: Criteo Kaggle's 26 field cardinalities
times ``scale``, Zipf values, ``min_count`` 1 so every id of the vocabulary occurs in train) is
generated once per target vocabulary (``--scale-ids``, default 1M and 4M ids) and cached under
``<bench cache>/scale/``. The rows are ``--scale-rows-per-id`` times the ids (default 2; Criteo
Kaggle itself has 0.74 ids per row) and ``scale`` is solved so the expected number of distinct
train values hits the target (:func:`expected_ids`, exact for the generator's Zipf law); the
ids actually drawn are recorded. Shards are small (64k rows) and the loaders cache nothing, so
the data a run holds stays one shard, whatever the vocabulary.

Every registered method (``--methods`` restricts them) trains at ``--scale-budget`` (10x;
``full`` at 1x) in a fresh subprocess on one thread, so its peak RSS is its own:

- **step ms**: median wall time of the first training stage's steps after ``--scale-warmup``
  (the method's ``after_step`` hook and a bilevel stage's architecture step included), and
  its CPU time (the process's), which the fits and the plot use: on a shared machine wall
  time mostly measures the other processes, and every method runs in its own process, so
  wall times of two methods are never side by side;
- **stage s**: each stage's wall time. Every stage runs its configured share of an epoch, the
  run's epoch being cut to ``--scale-steps`` steps (options named ``*_epochs`` with a number
  as default are scaled alike), so searches, pruning passes and rebuilds at the end of a
  stage run once at full vocabulary;
- **peak RSS** (the child's ``VmHWM``; ``ru_maxrss`` of a child on Linux carries its parent's
  high-water mark across fork and exec) after building and training, and what exporting and
  then loading and serving the artifact added to it; the training peak above the child's RSS
  after its imports is set against the method's ``train_bytes`` plus one decoded shard, and
  its growth from the smallest to the largest vocabulary against theirs (``dRSS/dtrain``:
  the constant dense network and activations cancel out; 1 is ideal);
- **export** time and artifact size (``ctr.export``), then **serving lookups/s**: ids per
  second of the reloaded artifact's embedding (``CompactModel``) over test batches, each
  batch's best of 3 on the thread's CPU clock.

A method that refuses (its budget cannot be met, not enough memory, an error, the per-run
``--scale-timeout``) is recorded with a one-line reason. The result has a table, the JSON, and
a log-log plot of step time and RSS above imports against ids with each method's fitted
exponent (least squares on the logs).

Run: ``python bench.py --only scale --scale-ids 1e6,4e6 --methods full,hash,pep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.output import CACHE, print_table
from datasets.io import atomic_write, atomic_write_text

SECTION = "scale"
ROWS_PER_SHARD = 1 << 16
RESULT_TAG = "SCALE_RESULT "
MAX_SCALE = 4.0  # times Criteo Kaggle's cardinalities; beyond, more rows per id are drawn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The section's flags (``--methods`` may already be defined by the bench's parser)."""
    group = parser.add_argument_group("scale")
    group.add_argument(
        "--scale-ids",
        default="1e6,4e6",
        help="scale: target vocabularies (total ids), comma-separated (e.g. 1e6,4e6,16e6)",
    )
    try:
        group.add_argument("--methods", default="", help="methods (default: all registered)")
    except argparse.ArgumentError:
        pass  # the bench's own --methods (comma-separated) serves this section too
    group.add_argument(
        "--scale-budget", default="10x", help="scale: budget of every method but full"
    )
    group.add_argument(
        "--scale-steps", type=int, default=10, help="scale: training steps per (cut) epoch"
    )
    group.add_argument("--scale-warmup", type=int, default=2, help="scale: untimed first steps")
    group.add_argument("--scale-batch-size", type=int, default=4096, help="scale: batch rows")
    group.add_argument("--scale-model", default="deepfm", help="scale: model")
    group.add_argument(
        "--scale-rows-per-id", type=float, default=2.0, help="scale: generated rows per target id"
    )
    group.add_argument(
        "--scale-timeout", type=float, default=300.0, help="scale: seconds per method and scale"
    )
    group.add_argument(
        "--scale-budgets",
        default="",
        help='scale: per-method budgets as JSON, e.g. \'{"int8": "3x"}\' (methods that cannot '
        "reach --scale-budget: int8, int16, ptq, alpt, autodim)",
    )
    group.add_argument(
        "--scale-options",
        default="",
        help='scale: per-method options as JSON, e.g. \'{"optembed": {"generations": 5}}\'',
    )
    group.add_argument(
        "--scale-reuse",
        action="store_true",
        help="scale: reuse a saved run of the same method, data and settings (each run is "
        "saved under <bench cache>/scale/runs/ with the commit it ran on) instead of rerunning "
        "it, so a table can be built up over several invocations",
    )


# ------------------------------------------------------------------------------------ data
def _zipf_cdf(x: Any, n: int, a: float) -> Any:
    """The generator's continuous Zipf CDF on [1, n + 1] (``datasets.synthetic``'s inversion):
    rank r is drawn with probability ``cdf(r + 2) - cdf(r + 1)``."""
    return (x ** (1.0 - a) - 1.0) / ((n + 1.0) ** (1.0 - a) - 1.0)


def _expected_distinct(n: int, a: float, draws: float, head: int = 4096) -> float:
    """Expected distinct ranks among ``draws`` Zipf draws over ``n`` values: exact over the
    ``head`` most frequent ranks, over geometric bins of ranks (1% wide, where probabilities
    barely change) beyond."""
    import numpy as np

    h = min(n, head)
    edges = np.arange(1, h + 2, dtype=np.float64)
    p = np.diff(_zipf_cdf(edges, n, a))
    total = float(-np.expm1(draws * np.log1p(-np.minimum(p, 1.0 - 1e-16))).sum())
    if n > h:
        bins = np.unique(np.geomspace(h, n, max(2, int(math.log(n / h) / math.log(1.01)))).round())
        bins[0], bins[-1] = h, n
        count = np.diff(bins)
        mass = np.diff(_zipf_cdf(bins + 1.0, n, a))
        keep = count > 0
        p = mass[keep] / count[keep]
        total += float((count[keep] * -np.expm1(draws * np.log1p(-p))).sum())
    return total


def expected_ids(config: Any) -> float:
    """Expected vocabulary (ids, OOV rows included) of ``generate_synthetic(config)`` with
    ``min_count`` 1: every train value drawn at least once, per field, plus its OOV row."""
    train = config.rows * (1.0 - config.valid_fraction - config.test_fraction)
    return sum(
        1.0 + _expected_distinct(n, config.zipf_exponent, train) for n in config.field_sizes()
    )


def synthetic_config(target_ids: int, rows_per_id: float = 2.0) -> Any:
    """A Criteo-shaped :class:`SyntheticConfig` whose expected vocabulary is ``target_ids``:
    ``rows_per_id`` x ``target_ids`` rows, the cardinalities' ``scale`` solved by bisection
    (rows grow by half while the target needs more than ``MAX_SCALE``)."""
    from datasets.synthetic import SyntheticConfig

    rows = max(1000, round(rows_per_id * target_ids))
    while True:
        base = SyntheticConfig(
            rows=rows, min_count=1, rows_per_shard=ROWS_PER_SHARD, chunk_rows=1 << 16
        )

        def ids(scale: float, base: Any = base) -> float:
            return expected_ids(_replace(base, scale=scale))

        if ids(MAX_SCALE) >= target_ids:
            break
        rows = round(rows * 1.5)
    lo, hi = 1e-4, MAX_SCALE
    if ids(lo) > target_ids:
        raise ValueError(
            f"--scale-ids: {target_ids:,} ids is below the smallest Criteo-shaped vocabulary "
            f"of {rows:,} rows (about {ids(lo):,.0f} ids)"
        )
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ids(mid) < target_ids else (lo, mid)
        if hi / lo < 1.002:
            break
    return _replace(base, scale=round(hi, 6))


def _replace(config: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(config, **changes)


def scale_dataset(target_ids: int, rows_per_id: float, root: Path) -> dict[str, Any]:
    """The cached dataset for ``target_ids`` (generated streaming on first use)."""
    from datasets.prepared import DatasetMeta
    from datasets.synthetic import generate_synthetic

    cfg = synthetic_config(target_ids, rows_per_id)
    path = root / f"synth-ids{target_ids}-rows{cfg.rows}-scale{cfg.scale:g}"
    seconds = None
    if not (path / "meta.json").exists():
        print(f"generating {path} ({cfg.rows:,} rows, scale {cfg.scale:g}) ...", flush=True)
        start = time.perf_counter()
        generate_synthetic(path, cfg, progress=False)
        seconds = round(time.perf_counter() - start, 1)
    meta = DatasetMeta.load(path)
    return {
        "target_ids": target_ids,
        "ids": sum(f.cardinality for f in meta.sparse),
        "expected_ids": round(expected_ids(cfg)),
        "rows": cfg.rows,
        "scale": cfg.scale,
        "generate_s": seconds,
        "path": str(path.resolve()),
    }


# ------------------------------------------------------------------------------------ child
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Trains, exports and serves one method at one scale (in its own process); the figures."""
    try:
        return _child(spec)
    except Exception as e:  # noqa: BLE001 - any failure is this method's refusal, recorded
        reason = " ".join(str(e).split()) or type(e).__name__
        return {"status": "refused", "reason": f"{type(e).__name__}: {reason}"[:300]}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import statistics

    import torch

    from compressors import method_options
    from ctr import CompactModel, RunConfig, TrainConfig, Trainer, export
    from ctr.training.run import build_run_model, check_memory
    from datasets.loader import BatchLoader
    from datasets.prepared import DatasetMeta

    torch.set_num_threads(1)
    base_kb = _status_kb("VmRSS")
    meta = DatasetMeta.load(spec["data"])
    bs, steps = spec["batch_size"], spec["steps"]
    train = BatchLoader(meta, "train", bs, shuffle=True, drop_last=True, cache_rows=0)
    # An epoch cut to `steps` batches; stages with their own epochs keep their proportion.
    fraction = min(1.0, steps / max(1, len(train)))
    options = dict(spec["options"])
    for name, default in method_options(spec["method"]).items():
        if name.endswith("_epochs") and isinstance(default, int | float) and default > 0:
            options.setdefault(name, default * fraction)
    cfg = RunConfig(
        data=spec["data"],
        model=spec["model"],
        compressor=spec["method"],
        budget=spec["budget"],
        method_options=options,
        train=TrainConfig(epochs=fraction, batch_size=bs, progress=False, eval_batch_size=8192),
    )
    cfg = cfg.resolved()  # the table optimiser and lr the method trains with, as train_run
    cfg.validate()
    check_memory(cfg, meta)
    start = time.perf_counter()
    model = build_run_model(cfg, meta)
    build_s = time.perf_counter() - start
    planned = model.embedding.memory()
    valid_rows = 2 * 8192
    valid = BatchLoader(meta, "valid", 8192, cache_rows=0).share(
        0.0, min(1.0, valid_rows / meta.rows("valid"))
    )
    trainer = Trainer(model, train, valid, cfg.train)

    # Per step: train step + a bilevel stage's architecture step + the method's hook, in
    # wall and CPU seconds (the process's: on a shared machine wall time measures the others).
    steps_by_stage: dict[str, list[tuple[float, float]]] = {}
    compressor = trainer.compressor

    def timed(fn: Any, new_step: bool) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                dt, dc = time.perf_counter() - t, time.process_time() - c
                stage = compressor.stages[trainer.state.stage].name
                times = steps_by_stage.setdefault(stage, [])
                if new_step or not times:
                    times.append((dt, dc))
                else:
                    times[-1] = (times[-1][0] + dt, times[-1][1] + dc)

        return wrapper

    trainer.train_step = timed(trainer.train_step, True)
    trainer.valid_step = timed(trainer.valid_step, False)
    compressor.after_step = timed(compressor.after_step, False)
    start = time.perf_counter()
    record = trainer.fit()
    fit_s = time.perf_counter() - start
    fit_peak_kb = _status_kb("VmHWM")  # building and training; export and serving come next
    warm = spec["warmup"]

    def median_ms(v: list[tuple[float, float]], i: int) -> float:
        return statistics.median(x[i] for x in (v[warm:] if len(v) > warm else v)) * 1e3

    by_stage = {k: median_ms(v, 0) for k, v in steps_by_stage.items()}
    cpu_by_stage = {k: median_ms(v, 1) for k, v in steps_by_stage.items()}
    first = next(iter(steps_by_stage), None)
    memory = model.embedding.memory()

    scratch = Path(tempfile.mkdtemp(prefix="scale-", dir=spec["scratch"]))
    try:
        artifact = scratch / "artifact"
        start = time.perf_counter()
        export(model, artifact)
        export_s = time.perf_counter() - start
        export_peak_kb = _status_kb("VmHWM")
        export_bytes = sum(p.stat().st_size for p in artifact.iterdir())
        start = time.perf_counter()
        compact = CompactModel.load(artifact)
        load_s = time.perf_counter() - start
        test = BatchLoader(meta, "test", bs, cache_rows=0).share(
            0.0, min(1.0, 4 * bs / meta.rows("test"))
        )
        batches = [b.sparse_features for _, b in zip(range(4), test, strict=False)]
        lookups = _lookups_per_s(compact.model.embedding, batches)
    finally:
        shutil.rmtree(scratch)  # the bench's own scratch directory
    peak_kb = _status_kb("VmHWM")
    import resource

    # For reference only: on Linux it carries the parent's high-water mark across exec.
    ru_maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shard_bytes = ROWS_PER_SHARD * _decoded_row_bytes(meta)
    return {
        "status": "ok",
        "finished": record["finished"],
        "step_ms": by_stage.get(first),
        "step_cpu_ms": cpu_by_stage.get(first),
        "step_ms_by_stage": by_stage,
        "step_cpu_ms_by_stage": cpu_by_stage,
        "steps_by_stage": {k: len(v) for k, v in steps_by_stage.items()},
        "stage_s": record["stage_seconds"],
        "build_s": build_s,
        "fit_s": fit_s,
        "train_bytes": memory.train_bytes,
        "planned_train_bytes": planned.train_bytes,
        "serve_bytes": memory.serve_bytes,
        "full_bytes": memory.full_bytes,
        "peak_rss_bytes": peak_kb * 1024,
        "fit_peak_rss_bytes": fit_peak_kb * 1024,
        "export_peak_rss_bytes": export_peak_kb * 1024,
        "base_rss_bytes": base_kb * 1024,
        "ru_maxrss_bytes": ru_maxrss_kb * 1024,
        "buffer_bytes": shard_bytes,
        "export_s": export_s,
        "export_bytes": export_bytes,
        "load_s": load_s,
        "lookups_per_s": lookups,
    }


def _decoded_row_bytes(meta: Any) -> int:
    """A loader row's bytes: the parquet columns read (4 B each) and their decoded arrays
    (ids as int64, dense and label as float32)."""
    columns = 1 + len(meta.dense) + len(meta.sparse)
    return 4 * columns + 4 * (1 + len(meta.dense)) + 8 * len(meta.sparse)


def _lookups_per_s(embedding: Any, batches: list, repeats: int = 3) -> float:
    """Ids per CPU-second of ``embedding`` over ``batches`` (each batch's best of
    ``repeats`` on this thread's clock: wall time on a shared machine measures the others)."""
    import torch

    best = [math.inf] * len(batches)
    with torch.inference_mode():
        embedding(batches[0])  # warm-up
        for _ in range(repeats):
            for i, kjt in enumerate(batches):
                start = time.thread_time()
                embedding(kjt)
                best[i] = min(best[i], time.thread_time() - start)
    return sum(len(kjt.values()) for kjt in batches) / max(sum(best), 1e-9)


def _module_name() -> str:
    return __name__


def _repo_root() -> Path:
    here = Path(__file__).resolve().parent
    return next((p for p in (here, *here.parents) if (p / "pyproject.toml").exists()), here)


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs :func:`child_main` in a fresh interpreter on one thread; a timeout, a crash or a
    kill is a refusal with its reason."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    root = str(_repo_root())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    code = (
        "import importlib, json, sys\n"
        f"m = importlib.import_module({_module_name()!r})\n"
        f"print({RESULT_TAG!r} + json.dumps(m.child_main(json.loads(sys.argv[1]))), flush=True)\n"
    )
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"status": "refused", "reason": f"timed out after {timeout:g} s"}
    wall = time.perf_counter() - start
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if lines:
        return {**json.loads(lines[-1][len(RESULT_TAG) :]), "wall_s": wall}
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode}"
        reason += " (out of memory?)" if proc.returncode == -9 else ""
    else:
        tail = [x for x in proc.stderr.splitlines() if x.strip()]
        reason = f"exit code {proc.returncode}: {tail[-1].strip() if tail else 'no output'}"
    return {"status": "refused", "reason": reason[:300], "wall_s": wall}


# ------------------------------------------------------------------------------------ section
def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x) over the positive points (None below two)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def marginal_rss(runs: list[dict[str, Any]]) -> float | None:
    """Growth of RSS above imports per byte of ``train_bytes`` + shard buffer, from the
    smallest to the largest vocabulary (None below two): what the vocabulary costs beyond the
    method's own bytes, free of the constant dense network and activations (1 is ideal)."""
    if len(runs) < 2:
        return None
    lo, hi = min(runs, key=lambda r: r["ids"]), max(runs, key=lambda r: r["ids"])

    def need(r: dict[str, Any]) -> int:
        return r["train_bytes"] + r["buffer_bytes"]

    if need(hi) <= need(lo):
        return None
    return (hi["rss_above_base_bytes"] - lo["rss_above_base_bytes"]) / (need(hi) - need(lo))


def parse_ids(text: str) -> list[int]:
    """``1e6,4e6`` -> [1000000, 4000000]; a bad entry names the flag."""
    try:
        ids = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--scale-ids: expected numbers like 1e6,4e6, got {text!r}") from None
    if not ids or any(i < 100 for i in ids):
        raise ValueError(f"--scale-ids: expected vocabularies of at least 100 ids, got {text!r}")
    return sorted(set(ids))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Cost against vocabulary of every method (see the module docstring); prints a table,
    writes the plot and returns the figures."""
    from compressors import available

    targets = parse_ids(args.scale_ids)
    methods = [m for m in (args.methods or "").split(",") if m] or available()
    unknown = sorted(set(methods) - set(available()))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; registered: {available()}")
    options = _json_object(args.scale_options, "--scale-options", "method -> options")
    budgets = _json_object(args.scale_budgets, "--scale-budgets", "method -> budget")
    root = CACHE / "scale"
    root.mkdir(parents=True, exist_ok=True)
    data, runs = [], []
    for target in targets:
        info = scale_dataset(target, args.scale_rows_per_id, root / "data")
        data.append(info)
        print(f"scale: {info['ids']:,} ids ({info['rows']:,} rows) at {info['path']}", flush=True)
        for method in methods:
            spec = {
                "data": info["path"],
                "method": method,
                "budget": budgets.get(method, "1x" if method == "full" else args.scale_budget),
                "options": options.get(method, {}),
                "model": args.scale_model,
                "batch_size": args.scale_batch_size,
                "steps": args.scale_steps,
                "warmup": args.scale_warmup,
                "scratch": str(root),
            }
            saved = root / "runs" / _run_key(spec)
            result = _load_run(saved, spec) if args.scale_reuse else None
            if result is None:
                result = {**run_child(spec, args.scale_timeout), "commit": _commit()}
                saved.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(saved, json.dumps({"spec": spec, **result}))
            else:
                print(f"  {method}: reusing {saved} (commit {result.get('commit')})", flush=True)
            row = {"method": method, "budget": spec["budget"], "ids": info["ids"], **result}
            if row["status"] == "ok":
                above = row["fit_peak_rss_bytes"] - row["base_rss_bytes"]
                row["rss_above_base_bytes"] = above
                row["rss_over_train"] = above / max(row["train_bytes"] + row["buffer_bytes"], 1)
            runs.append(row)
            _print_progress(row)
    fits = {}
    for method in methods:
        ok = [r for r in runs if r["method"] == method and r["status"] == "ok"]
        ids = [r["ids"] for r in ok]
        fits[method] = {
            "step_exponent": fit_exponent(ids, [r["step_cpu_ms"] for r in ok]),
            "rss_exponent": fit_exponent(ids, [r["rss_above_base_bytes"] for r in ok]),
            "rss_per_train_byte": marginal_rss(ok),
            "points": len(ok),
        }
    table = table_rows(runs, fits)
    print_table(f"scale: every method at {args.scale_budget} (full at 1x), one thread", table)
    plot = plot_scale(runs, fits, CACHE / "results" / "scale.png")
    print(f"scale: plot {plot}")
    return {"data": data, "runs": runs, "fits": fits, "table": table, "plot": plot}


def _run_key(spec: dict[str, Any]) -> str:
    """A saved run's file name: method, budget and data, plus a digest of the other settings."""
    import hashlib

    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"{spec['method']}-{spec['budget']}-{Path(spec['data']).name}-{digest}.json"


def _load_run(path: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of exactly ``spec``, or None (missing, unreadable, other settings, or
    a timeout, which a rerun with a longer ``--scale-timeout`` may finish)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if saved.pop("spec", None) != spec or saved.get("reason", "").startswith("timed out"):
        return None
    return saved


def _commit() -> str | None:
    """The repository's commit (with ``+`` when the tree has changes), or None outside git."""
    try:
        run = {"cwd": _repo_root(), "capture_output": True, "text": True, "timeout": 10}
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+" if dirty else "")) or None


def _print_progress(row: dict[str, Any]) -> None:
    if row["status"] == "ok":
        print(
            f"  {row['method']:10s} {row['ids']:>11,} ids: step {row['step_ms']:.1f} ms "
            f"({row['step_cpu_ms']:.1f} ms CPU), "
            f"train peak {row['fit_peak_rss_bytes'] / 2**20:.0f} MiB, "
            f"peak {row['peak_rss_bytes'] / 2**20:.0f} MiB, {row.get('wall_s', 0):.0f} s",
            flush=True,
        )
    else:
        print(f"  {row['method']:10s} {row['ids']:>11,} ids: refused: {row['reason']}", flush=True)


def table_rows(runs: list[dict[str, Any]], fits: dict[str, dict[str, Any]]) -> list[dict]:
    """One row per method and scale: the figures in readable units, or the refusal."""
    mb = 2**20
    rows = []
    for r in runs:
        fit = fits.get(r["method"], {})
        row: dict[str, Any] = {"method": r["method"], "budget": r["budget"], "ids": r["ids"]}
        row["commit"] = r.get("commit")
        if r["status"] != "ok":
            rows.append({**row, "step ms": None, "refused": r["reason"]})
            continue
        rows.append(
            {
                **row,
                "step ms": r["step_ms"],
                "step cpu ms": r["step_cpu_ms"],
                "stages s": " ".join(f"{k}={v:.1f}" for k, v in r["stage_s"].items()),
                "train MiB": r["train_bytes"] / mb,
                "train peak MiB": r["fit_peak_rss_bytes"] / mb,
                "above import MiB": r["rss_above_base_bytes"] / mb,
                "+export MiB": (r["export_peak_rss_bytes"] - r["fit_peak_rss_bytes"]) / mb,
                "+serve MiB": (r["peak_rss_bytes"] - r["export_peak_rss_bytes"]) / mb,
                "/(train+shard)": r["rss_over_train"],
                "export s": r["export_s"],
                "export MiB": r["export_bytes"] / mb,
                "lookups/s": r["lookups_per_s"],
                "k step": fit.get("step_exponent"),
                "k rss": fit.get("rss_exponent"),
                "dRSS/dtrain": fit.get("rss_per_train_byte"),
                "refused": "",
            }
        )
    return rows


def plot_scale(runs: list[dict[str, Any]], fits: dict[str, dict[str, Any]], path: Path) -> str:
    """Log-log step time and RSS above imports against ids, one line per method labelled
    with its fitted exponent; the path, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed"
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return "no plot: no method finished"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    panels = [
        ("step_cpu_ms", "step_exponent", "step CPU time (ms, one thread)"),
        ("rss_above_base_bytes", "rss_exponent", "training peak RSS above imports (bytes)"),
    ]
    for ax, (key, fit_key, label) in zip(axes, panels, strict=True):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in ok)):
            pts = sorted((r["ids"], r[key]) for r in ok if r["method"] == method and r[key])
            k = fits.get(method, {}).get(fit_key)
            name = f"{method} (k={k:.2f})" if k is not None else method
            # 20 colours, and a marker and a dash that change with them: every method of
            # the registry gets its own look.
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color=plt.get_cmap("tab20")(i % 20),
                marker="osD^v<>P"[i % 8],
                linestyle="-" if i % 2 == 0 else "--",
                label=name,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("ids (vocabulary)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("cost against vocabulary; k = fitted log-log exponent")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return str(path)


def _json_object(text: str | None, flag: str, what: str) -> dict:
    """``flag``'s JSON object (empty when not given), or a one-line error naming the flag."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: invalid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object of {what}")
    return value
