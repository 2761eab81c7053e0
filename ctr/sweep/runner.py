"""Fair memory–accuracy sweeps: data × models × methods × budgets × seeds under one protocol.

Every cell (one dataset, model, method, budget and seed) is trained by the same
:class:`ProtocolConfig`: all embedding parameters — tables, TT cores, ROBE's array, DHE's
network, the pruning family's row tables, ``full``'s tables alike — use one optimiser family
(rowwise Adagrad by default, what fbgemm fuses on CPU; modules get
:class:`compressors.core.optim.RowwiseAdagrad`; the optimiser can be an axis of the grid,
Adam included, see :class:`ProtocolConfig`) with decoupled embedding L2
(:mod:`compressors.core.decay`); the dense network uses Adam. Each cell tries every point of the
validation grid (embedding lr × embedding L2), each point trained up to ``epochs`` with
``evals_per_epoch`` evaluations per epoch, patience, lr decay on plateau and best-weight
restore; the point with the best validation AUC is the cell's result, reported on test with the
chosen point. Budgets a method cannot meet are decided without training (:func:`feasibility`)
and recorded as ``infeasible``. ``full`` at ``1x`` runs once per seed as the reference.

Layout of a sweep directory::

    OUT/sweep.json                        the spec (latest)
    OUT/cells/<method>-<budget>-<model>-seed<S>-<hash>/
        cell.json                         the cell's config (its hash names the dir)
        p0/, p1/, ...                     one resumable run dir per grid point (ctr.training.run)
        result.json                       written atomically when the cell is done

Rerunning the same command resumes: finished cells are read back, an interrupted grid point
continues from its checkpoint. Cells run in this process (``workers=1``), in ``workers``
local processes (torch threads = cores / workers), or as Ray tasks on a cluster whose nodes
see the same data and output paths (``executor="ray"``; ``address="local"`` starts a private
local instance).

Example::

    spec = SweepSpec(data=["data/synth"], methods=["hash", "tt"], budgets=["10x", "100x"],
                     seeds=[0, 1, 2])
    run_sweep(spec, "sweeps/synth", workers=2)
    write_report("sweeps/synth")          # results.csv/.parquet, summary.md, pareto.png
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ctr.sweep.spec import (
    CELL_FILE,
    RESULT_FILE,
    SPEC_FILE,
    Cell,
    CellResult,
    SweepSpec,
    cell_dir,
)
from ctr.training.resources import available_cpus
from datasets.io import atomic_write_text
from datasets.prepared import DatasetMeta

Log = Callable[[str], None]


def code_version() -> str | None:
    """The commit of the code that trains a cell (``+dirty`` with uncommitted changes), or
    None outside a git checkout. Recorded with results, not hashed into keys: a key names
    what a cell trains, and a rerun under newer code still finds the finished cell."""
    root = str(Path(__file__).resolve().parents[2])

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def method_defaults(method: str) -> dict[str, Any]:
    """The method's option defaults in this code, as JSON would store them: recorded with
    each result so that a later rerun can tell a cell finished under other defaults."""
    from compressors.core.registry import method_options

    return json.loads(json.dumps(method_options(method), default=str))


def changed_defaults(result: CellResult) -> dict[str, tuple[Any, Any]] | None:
    """``{option: (then, now)}`` for defaults that changed since ``result`` was written;
    None when the result predates recorded defaults."""
    then = result.method_defaults
    if then is None:
        return None
    now = method_defaults(result.method)
    return {
        k: (then.get(k), now.get(k))
        for k in sorted(set(then) | set(now))
        if then.get(k) != now.get(k)
    }


class SweepData:
    """What a sweep reads of its datasets, each read once: ``meta.json`` and, for the
    feasibility checks, the features with their frequencies (and fingerprints)."""

    def __init__(self) -> None:
        self._meta: dict[str, DatasetMeta] = {}
        self._features: dict[tuple[str, bool], list[Any]] = {}

    def meta(self, data: str) -> DatasetMeta:
        if data not in self._meta:
            self._meta[data] = DatasetMeta.load(data)
        return self._meta[data]

    def features(self, cell: Cell) -> list[Any]:
        from ctr.embedding import features_from_dataset

        key = (cell.data, cell.method_options.get("keys") == "fingerprint")
        if key not in self._features:
            self._features[key] = features_from_dataset(self.meta(cell.data), key[1])
        return self._features[key]

    def drop_features(self) -> None:
        """Frees the features (a frequency per id: large for real datasets) once every
        cell's feasibility is decided, before training takes the memory."""
        self._features.clear()


def feasibility(cell: Cell, data: SweepData | None = None) -> str | None:
    """None when the method can meet the cell's budget, else why not — decided by the
    method's solver (:func:`compressors.solve`), which allocates no weights."""
    from compressors import BudgetError, solve

    features = (data or SweepData()).features(cell)
    try:
        solve(cell.method, features, cell.dim, cell.budget, **cell.method_options)
    except BudgetError as e:
        return str(e)
    return None


def _result(cell: Cell, status: str, **values: Any) -> CellResult:
    return CellResult.of(
        cell,
        status,
        method_defaults=method_defaults(cell.method),
        code_version=code_version(),
        **values,
    )


def run_cell(cell: Cell, directory: str | Path, meta: DatasetMeta | None = None) -> CellResult:
    """Runs (or resumes, or reads back) one cell; returns and atomically writes its result.

    ``meta``: the cell's dataset as the sweep read it, the sweep having decided already that
    the cell is feasible; without it, both are done here."""
    from ctr.training.run import RunConfig, auto_batch_size, train_run

    directory = Path(directory)
    done = directory / RESULT_FILE
    if done.exists():
        return CellResult.load(done)
    _write_cell(cell, directory)
    started = time.perf_counter()
    if meta is None:
        data = SweepData()
        reason = feasibility(cell, data)
        if reason is not None:
            return _write_result(_result(cell, "infeasible", reason=reason), directory)
        meta = data.meta(cell.data)
    protocol = cell.protocol
    batch = protocol.batch_size or auto_batch_size(meta.rows("train"))
    grid = []
    for i, point in enumerate(protocol.points()):
        run = directory / f"p{i}"
        summary_path = run / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
        else:
            cfg = RunConfig(
                data=cell.data,
                model=cell.model,
                model_options=cell.model_options,
                dim=cell.dim,
                compressor=cell.method,
                budget=cell.budget,
                method_options=cell.method_options,
                train=protocol.train_config(point, cell.seed, batch),
            )
            summary = train_run(cfg, run)
        grid.append((point, summary))
    point, chosen = max(grid, key=lambda g: g[1]["valid_auc"])
    result = _result(
        cell,
        "done",
        summary=chosen,
        chosen=point,
        batch_size=batch,
        grid=[{**p, "valid_auc": s["valid_auc"]} for p, s in grid],
        grid_train_seconds=sum(s.get("train_seconds", 0.0) for _, s in grid),
        cell_seconds=time.perf_counter() - started,
    )
    return _write_result(result, directory)


def _write_cell(cell: Cell, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / CELL_FILE, json.dumps(cell.to_json(), indent=2))


def _write_result(result: CellResult, directory: Path) -> CellResult:
    atomic_write_text(directory / RESULT_FILE, json.dumps(result.to_json(), indent=2))
    return result


# ---------------------------------------------------------------- executors
def _set_threads(threads: int) -> None:
    from ctr.training.resources import configure_threads

    os.environ["OMP_NUM_THREADS"] = str(threads)
    configure_threads(threads, warn=False)


def _local_task(cell: Cell, directory: str, meta: DatasetMeta, threads: int) -> CellResult:
    _set_threads(threads)
    return run_cell(cell, directory, meta)


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    threads: int | None = None,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Runs every cell of ``spec`` under ``out`` (resuming); returns the results in cell
    order, as their ``result.json`` spells them (:func:`run_cells` gives them typed).

    ``threads``: torch threads per worker (default: the machine's cores / ``workers``).
    """
    results = run_cells(spec, out, workers, executor, address, threads, log)
    return [r.to_json() for r in results]


def run_cells(
    spec: SweepSpec,
    out: str | Path,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    threads: int | None = None,
    log: Log = print,
) -> list[CellResult]:
    """:func:`run_sweep`, returning :class:`CellResult` records."""
    if executor not in ("local", "ray"):
        raise ValueError(f"--executor must be local or ray, got {executor!r}")
    out = Path(out)
    _claim(out)
    atomic_write_text(out / SPEC_FILE, json.dumps(spec.to_json(), indent=2))
    cells = spec.cells()
    dirs = [cell_dir(out, c) for c in cells]
    results: dict[int, CellResult] = {}
    todo = []
    for i, d in enumerate(dirs):
        if (d / RESULT_FILE).exists():
            results[i] = CellResult.load(d / RESULT_FILE)
        else:
            todo.append(i)
    log(f"sweep {out}: {len(cells)} cells, {len(results)} done, {len(todo)} to run")
    _warn_stale(results, dirs, log)
    # The CPUs this process may use (affinity, cgroup quota), not the machine's cores; idle
    # OpenMP threads of the workers (spawned below, so they inherit it) sleep, not spin.
    threads = threads or max(1, available_cpus() // max(workers, 1))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def finished(i: int, result: CellResult) -> None:
        results[i] = _write_result(result, dirs[i])
        log(f"  [{len(results)}/{len(cells)}] {_describe(result)}")

    # Budgets a method cannot meet are decided here, by the solver, before any training:
    # each dataset is read once for the whole sweep, not once per cell.
    data = SweepData()
    trainable = []
    for i in todo:
        reason = feasibility(cells[i], data)
        if reason is None:
            trainable.append(i)
        else:
            _write_cell(cells[i], dirs[i])
            finished(i, _result(cells[i], "infeasible", reason=reason))
    data.drop_features()
    jobs = [(i, cells[i], str(dirs[i]), data.meta(cells[i].data)) for i in trainable]
    if executor == "ray":
        _run_ray(jobs, address, threads, finished)
    elif workers <= 1:
        _set_threads(threads)
        for i, cell, directory, meta in jobs:
            finished(i, run_cell(cell, directory, meta))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(
            min(workers, len(jobs)) or 1, mp_context=mp.get_context("spawn")
        ) as pool:
            futures = {pool.submit(_local_task, *job[1:], threads): job[0] for job in jobs}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    return [results[i] for i in range(len(cells))]


def _warn_stale(results: dict[int, CellResult], dirs: list[Path], log: Log) -> None:
    """Cell keys hash the options a spec names, not the code's defaults: a finished cell whose
    method defaults changed since is kept (it is the user's result) but named, with how to
    retrain it."""
    unknown = 0
    for i, result in sorted(results.items()):
        changed = changed_defaults(result)
        if changed is None:
            unknown += 1
        elif changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            log(
                f"  warning: {dirs[i].name} finished under other {result.method} defaults "
                f"({what}); kept — remove {dirs[i]} to retrain it under today's"
            )
    if unknown:
        log(
            f"  note: {unknown} finished cells predate recorded method defaults; kept as they "
            "are (their defaults cannot be checked)"
        )


def _run_ray(
    jobs: Iterable[tuple[int, Cell, str, DatasetMeta]],
    address: str | None,
    threads: int,
    finished: Callable[[int, CellResult], None],
) -> None:
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray: pip install 'ctr-compress[ray]'") from None
    root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env["OMP_NUM_THREADS"] = str(threads)
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=None if address in (None, "local") else address,
            runtime_env={"env_vars": env},
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        task = ray.remote(num_cpus=threads)(_local_task)
        pending = {task.remote(*job[1:], threads): job[0] for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                finished(pending.pop(ref), ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()


def _claim(out: Path) -> None:
    """A sweep writes only into a new, empty or earlier sweep directory (which it resumes and
    extends: every cell is its own directory, each file written atomically), never the
    current directory or one above it."""
    from datasets.io import refuse_current_dir

    refuse_current_dir(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / SPEC_FILE).is_file():
        raise ValueError(f"{out} is not empty and holds no {SPEC_FILE}: choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _describe(result: CellResult) -> str:
    head = f"{result.method} @ {result.budget} seed {result.seed}"
    if not result.done:
        return f"{head}: infeasible ({result.reason})"
    return (
        f"{head}: test AUC {result.test_auc:.4f} (lr {result.chosen['table_lr']}, "
        f"L2 {result.chosen.get('embedding_l2', 0.0)})"
    )
