"""Fair memory–accuracy sweeps: data × models × methods × budgets × seeds under one protocol.

Every cell (one dataset, model, method, budget and seed) is trained by the same
:class:`ProtocolConfig`: all embedding parameters — tables, TT cores, ROBE's array, DHE's
network, the pruning family's row tables, ``full``'s tables alike — use one optimiser family
(rowwise Adagrad by default, what fbgemm fuses on CPU; modules get
:class:`ctr.optim.RowwiseAdagrad`; the optimiser can be an axis of the grid, Adam included, see
:class:`ProtocolConfig`) with decoupled embedding L2
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
        p0/, p1/, ...                     one resumable run dir per grid point (ctr.run)
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

import hashlib
import itertools
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ctr.resources import available_cpus
from datasets.format import atomic_write_text

CELL_FILE = "cell.json"
RESULT_FILE = "result.json"
SPEC_FILE = "sweep.json"
REFERENCE = ("full", "1x")


@dataclass
class ProtocolConfig:
    """The training protocol every cell follows (see module docstring).

    ``grid`` lists explicit points (``{"table_lr": .., "embedding_l2": ..}``, optionally
    ``"table_optimizer"``); when empty the grid is ``table_lrs × embedding_l2s`` at
    ``optimizer``, or, with ``optimizers`` (e.g. ``["rowwise_adagrad", "adam"]``: each method
    can have its paper's optimiser and ``full`` the same chance), each optimiser × its lrs
    (``optimizer_lrs``, else ``table_lrs``) × ``embedding_l2s``. ``batch_size`` 0 picks
    :func:`ctr.run.auto_batch_size`.

    The default grid is rowwise Adagrad and Adam, each 3 lrs × 3 L2 values (18 points); the
    Adagrad part alone (``optimizers=[]`` or ``--optimizers rowwise_adagrad``) is the grid
    of sweeps before the optimiser axis. Why 3 × 3: on the 200k-row synthetic data
    (``results/full-l2-check/`` beside the main sweep's cells), the best of 7 points by
    validation AUC was L2 0 in 2 of 6 cells (``tt``), .01 in 2 and .03 in 2 (``full``), so
    dropping any of them under-tunes some method. ``--lrs``/``--l2s`` cut it for a quick sweep.
    """

    table_lrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1])
    embedding_l2s: list[float] = field(default_factory=lambda: [0.0, 1e-2, 3e-2])
    grid: list[dict[str, Any]] = field(default_factory=list)
    optimizer: str = "rowwise_adagrad"
    optimizers: list[str] = field(default_factory=lambda: ["rowwise_adagrad", "adam"])
    optimizer_lrs: dict[str, list[float]] = field(
        default_factory=lambda: {"adam": [3e-4, 1e-3, 3e-3]}
    )
    l2_mode: str = "lazy"
    epochs: float = 3.0
    evals_per_epoch: int = 4
    patience: int = 3
    lr_decay: float = 0.5
    dense_lr: float = 1e-3
    batch_size: int = 0
    eval_batch_size: int = 16384

    def points(self) -> list[dict[str, Any]]:
        if self.grid:
            return [dict(p) for p in self.grid]
        if not self.optimizers:
            return [
                {"table_lr": lr, "embedding_l2": l2}
                for lr, l2 in itertools.product(self.table_lrs, self.embedding_l2s)
            ]
        # The optimiser as an axis: each with its own lr scale (Adam's is not Adagrad's).
        # Points at ``optimizer`` do not name it: they train what points before the axis did.
        return [
            {
                **({"table_optimizer": opt} if opt != self.optimizer else {}),
                "table_lr": lr,
                "embedding_l2": l2,
            }
            for opt in self.optimizers
            for lr, l2 in itertools.product(
                self.optimizer_lrs.get(opt, self.table_lrs), self.embedding_l2s
            )
        ]

    def train_config(self, point: dict[str, float], seed: int, batch_size: int) -> Any:
        from ctr.trainer import TrainConfig

        return TrainConfig(
            epochs=self.epochs,
            batch_size=batch_size,
            lr=self.dense_lr,
            table_lr=point["table_lr"],
            table_optimizer=point.get("table_optimizer", self.optimizer),
            evals_per_epoch=self.evals_per_epoch,
            patience=self.patience,
            lr_decay=self.lr_decay,
            module_optimizer="table",
            embedding_l2=point.get("embedding_l2", 0.0),
            l2_mode=self.l2_mode,
            seed=seed,
            eval_batch_size=self.eval_batch_size,
            progress=False,
        )


@dataclass
class SweepSpec:
    """What to sweep. ``method_options`` maps a method name to its options."""

    data: list[str]
    models: list[str] = field(default_factory=lambda: ["deepfm"])
    methods: list[str] = field(default_factory=lambda: ["full"])
    budgets: list[str | int | float] = field(default_factory=lambda: ["1x"])
    seeds: list[int] = field(default_factory=lambda: [0])
    dim: int = 16
    model_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: bool = True
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any], source: str = "spec") -> SweepSpec:
        raw = dict(raw)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown field(s) {unknown}; expected some of {sorted(known)}"
            )
        protocol = raw.pop("protocol", {}) or {}
        bad = sorted(set(protocol) - set(ProtocolConfig.__dataclass_fields__))
        if bad:
            raise ValueError(f"{source}: unknown protocol field(s) {bad}")
        if "data" not in raw:
            raise ValueError(
                f"{source}: field 'data' (a list of prepared dataset dirs) is required"
            )
        for key in ("data", "models", "methods", "budgets", "seeds"):
            if key in raw and not isinstance(raw[key], list):
                raw[key] = [raw[key]]
        return cls(**raw, protocol=ProtocolConfig(**protocol))

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        """A JSON (or, with PyYAML installed, YAML) spec file."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text)
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sweep fields")
        return cls.from_json(raw, str(path))

    def cells(self) -> list[dict[str, Any]]:
        """Every cell's config (reference ``full`` cells first), in a stable order."""
        combos = [
            (d, m, method, budget, seed)
            for d in self.data
            for m in self.models
            for method in self.methods
            for budget in self.budgets
            for seed in self.seeds
        ]
        if self.reference:
            refs = [
                (d, m, *REFERENCE, s) for d in self.data for m in self.models for s in self.seeds
            ]
            combos = refs + [c for c in combos if (c[2], str(c[3])) != REFERENCE]
        protocol = asdict(self.protocol)
        return [
            {
                "data": str(d),
                "model": m,
                "model_options": self.model_options,
                "dim": self.dim,
                "method": method,
                "budget": budget,
                "method_options": self.method_options.get(method, {}),
                "seed": seed,
                "protocol": protocol,
            }
            for d, m, method, budget, seed in dict.fromkeys(combos)
        ]


def cell_key(cell: dict[str, Any]) -> str:
    """A stable hash of a cell's config (key order and JSON spelling do not matter)."""
    blob = json.dumps(cell, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def code_version() -> str | None:
    """The commit of the code that trains a cell (``+dirty`` with uncommitted changes), or
    None outside a git checkout. Recorded with results, not hashed into keys: a key names
    what a cell trains, and a rerun under newer code still finds the finished cell."""
    root = str(Path(__file__).resolve().parents[1])

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


def changed_defaults(result: dict[str, Any]) -> dict[str, tuple[Any, Any]] | None:
    """``{option: (then, now)}`` for defaults that changed since ``result`` was written;
    None when the result predates recorded defaults."""
    then = result.get("method_defaults")
    if then is None:
        return None
    now = method_defaults(result["method"])
    return {
        k: (then.get(k), now.get(k))
        for k in sorted(set(then) | set(now))
        if then.get(k) != now.get(k)
    }


def effective_protocol(protocol: dict[str, Any]) -> dict[str, Any]:
    """What a protocol trains: every field (defaults filled in for cells written before a
    field existed), the grid as its points and not the ``table_lrs``/``embedding_l2s`` an
    explicit grid overrides."""
    known = {f.name for f in fields(ProtocolConfig)}
    # Cells written before the optimiser axis trained ``optimizer`` alone.
    protocol = {"optimizers": [], **protocol}
    config = ProtocolConfig(**{k: v for k, v in protocol.items() if k in known})
    out = asdict(config)
    out["grid"] = config.points()
    del out["table_lrs"], out["embedding_l2s"], out["optimizers"], out["optimizer_lrs"]
    return out


def effective_key(cell: dict[str, Any]) -> str:
    """A hash of what a cell actually trains (:func:`effective_protocol`), so two cells that
    differ only in fields an explicit grid overrides (the default ``table_lrs``/
    ``embedding_l2s`` of the version that wrote them) hash alike. The report counts such
    twins once; run directories keep :func:`cell_key`."""
    return cell_key({**cell, "protocol": effective_protocol(cell.get("protocol", {}))})


def cell_dir(out: str | Path, cell: dict[str, Any]) -> Path:
    budget = str(cell["budget"]).replace("/", "_")
    name = f"{cell['method']}-{budget}-{cell['model']}-seed{cell['seed']}-{cell_key(cell)}"
    return Path(out) / "cells" / name


def feasibility(cell: dict[str, Any]) -> str | None:
    """None when the method can meet the cell's budget, else why not — decided by the
    method's solver (:func:`compressors.solve`), which allocates no weights."""
    from compressors import BudgetError, solve
    from ctr.embedding import features_from_dataset

    features = features_from_dataset(
        cell["data"], cell["method_options"].get("keys") == "fingerprint"
    )
    try:
        solve(cell["method"], features, cell["dim"], cell["budget"], **cell["method_options"])
    except BudgetError as e:
        return str(e)
    return None


def run_cell(cell: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """Runs (or resumes, or reads back) one cell; returns and atomically writes its result."""
    from ctr.run import RunConfig, auto_batch_size, train_run
    from datasets.format import DatasetMeta

    directory = Path(directory)
    done = directory / RESULT_FILE
    if done.exists():
        return json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / CELL_FILE, json.dumps(cell, indent=2))
    started = time.perf_counter()
    base = {k: cell[k] for k in ("data", "model", "method", "budget", "seed")}
    reason = feasibility(cell)
    if reason is not None:
        result = {
            **base,
            "status": "infeasible",
            "reason": reason,
            "key": cell_key(cell),
            "method_defaults": method_defaults(cell["method"]),
            "code_version": code_version(),
        }
        atomic_write_text(done, json.dumps(result, indent=2))
        return result
    protocol = ProtocolConfig(**cell["protocol"])
    meta = DatasetMeta.load(cell["data"])
    batch = protocol.batch_size or auto_batch_size(meta.rows("train"))
    grid = []
    for i, point in enumerate(protocol.points()):
        run = directory / f"p{i}"
        summary_path = run / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
        else:
            cfg = RunConfig(
                data=cell["data"],
                model=cell["model"],
                model_options=cell["model_options"],
                dim=cell["dim"],
                compressor=cell["method"],
                budget=cell["budget"],
                method_options=cell["method_options"],
                train=protocol.train_config(point, cell["seed"], batch),
            )
            summary = train_run(cfg, run)
        grid.append({"point": point, "summary": summary})
    best = max(grid, key=lambda g: g["summary"]["valid_auc"])
    chosen = best["summary"]
    result = {
        **base,
        "status": "done",
        "key": cell_key(cell),
        "method_defaults": method_defaults(cell["method"]),
        "code_version": code_version(),
        **{k: chosen.get(k) for k in _SUMMARY_KEYS},
        "chosen": best["point"],
        "batch_size": batch,
        "grid": [{**g["point"], "valid_auc": g["summary"]["valid_auc"]} for g in grid],
        "grid_train_seconds": sum(g["summary"].get("train_seconds", 0.0) for g in grid),
        "cell_seconds": time.perf_counter() - started,
    }
    atomic_write_text(done, json.dumps(result, indent=2))
    return result


_SUMMARY_KEYS = (
    "test_auc",
    "test_logloss",
    "valid_auc",
    "serve_bytes",
    "train_bytes",
    "full_bytes",
    "budget_bytes",
    "ratio",
    "hyperparameters",
    "samples_per_sec",
    "steps",
    "train_seconds",
    "stage_seconds",
    "wall_seconds",
    "teacher_test_auc",
)


# ---------------------------------------------------------------- executors
def _set_threads(threads: int) -> None:
    from ctr.resources import configure_threads

    os.environ["OMP_NUM_THREADS"] = str(threads)
    configure_threads(threads, warn=False)


def _local_task(cell: dict[str, Any], directory: str, threads: int) -> dict[str, Any]:
    _set_threads(threads)
    return run_cell(cell, directory)


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Runs every cell of ``spec`` under ``out`` (resuming); returns the results in cell order.

    ``threads``: torch threads per worker (default: the machine's cores / ``workers``).
    """
    out = Path(out)
    _claim(out)
    atomic_write_text(out / SPEC_FILE, json.dumps(spec.to_json(), indent=2))
    cells = spec.cells()
    dirs = [cell_dir(out, c) for c in cells]
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i, d in enumerate(dirs):
        if (d / RESULT_FILE).exists():
            results[i] = json.loads((d / RESULT_FILE).read_text())
        else:
            todo.append(i)
    log(f"sweep {out}: {len(cells)} cells, {len(results)} done, {len(todo)} to run")
    _warn_stale(results, dirs, log)
    # The CPUs this process may use (affinity, cgroup quota), not the machine's cores; idle
    # OpenMP threads of the workers (spawned below, so they inherit it) sleep, not spin.
    threads = threads or max(1, available_cpus() // max(workers, 1))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def finished(i: int, result: dict[str, Any]) -> None:
        results[i] = result
        atomic_write_text(dirs[i] / RESULT_FILE, json.dumps(result, indent=2))
        log(f"  [{len(results)}/{len(cells)}] {_describe(result)}")

    if executor == "ray":
        _run_ray(cells, dirs, todo, address, threads, finished)
    elif executor != "local":
        raise ValueError(f"--executor must be local or ray, got {executor!r}")
    elif workers <= 1:
        _set_threads(threads)
        for i in todo:
            finished(i, run_cell(cells[i], dirs[i]))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(
            min(workers, len(todo)) or 1, mp_context=mp.get_context("spawn")
        ) as pool:
            futures = {pool.submit(_local_task, cells[i], str(dirs[i]), threads): i for i in todo}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    return [results[i] for i in range(len(cells))]


def _warn_stale(
    results: dict[int, dict[str, Any]], dirs: list[Path], log: Callable[[str], None]
) -> None:
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
                f"  warning: {dirs[i].name} finished under other {result['method']} defaults "
                f"({what}); kept — remove {dirs[i]} to retrain it under today's"
            )
    if unknown:
        log(
            f"  note: {unknown} finished cells predate recorded method defaults; kept as they "
            "are (their defaults cannot be checked)"
        )


def _run_ray(
    cells: list[dict[str, Any]],
    dirs: list[Path],
    todo: Iterable[int],
    address: str | None,
    threads: int,
    finished: Callable[[int, dict[str, Any]], None],
) -> None:
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray: pip install 'ctr-compress[ray]'") from None
    root = str(Path(__file__).resolve().parent.parent)
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
        pending = {task.remote(cells[i], str(dirs[i]), threads): i for i in todo}
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


def _describe(result: dict[str, Any]) -> str:
    head = f"{result['method']} @ {result['budget']} seed {result['seed']}"
    if result["status"] != "done":
        return f"{head}: infeasible ({result['reason']})"
    return (
        f"{head}: test AUC {result['test_auc']:.4f} (lr {result['chosen']['table_lr']}, "
        f"L2 {result['chosen'].get('embedding_l2', 0.0)})"
    )


def load_results(out: str | Path) -> list[dict[str, Any]]:
    """Every finished cell's result under ``out`` (any spec that wrote there), each with its
    cell's ``method_options`` (from ``cell.json``), so that one method run with two option
    sets is never read as one, and its :func:`effective_key`."""
    paths = sorted((Path(out) / "cells").glob(f"*/{RESULT_FILE}"))
    if not paths:
        raise ValueError(f"{out}: no finished cells (cells/*/{RESULT_FILE}); run `ctr sweep run`")
    results = []
    for path in paths:
        result = json.loads(path.read_text())
        cell = path.with_name(CELL_FILE)
        if cell.exists():
            config = json.loads(cell.read_text())
            result.setdefault("method_options", config.get("method_options", {}))
            result["effective_key"] = effective_key(config)
            result["protocol"] = effective_protocol(config.get("protocol", {}))
        results.append(result)
    return results
