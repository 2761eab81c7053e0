"""The records of a sweep: what to sweep (:class:`SweepSpec` under a :class:`ProtocolConfig`),
one cell of it (:class:`Cell`) and what a cell gave (:class:`CellResult`).

Each record is a dataclass with ``to_json``/``from_json``; its fields are the one definition of
its keys. A cell's JSON is what its key hashes (:func:`cell_key`), so ``Cell.to_json`` spells a
cell exactly as the sweeps before these classes did: finished cells keep their directories.

Example::

    spec = SweepSpec.load("sweep.json")
    for cell in spec.cells():
        print(cell.key, cell.method, cell.budget, len(cell.protocol.points()))
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ctr.training.summary import RunSummary

CELL_FILE = "cell.json"
RESULT_FILE = "result.json"
SPEC_FILE = "sweep.json"
REFERENCE = ("full", "1x")

Budget = str | int | float


@dataclass
class ProtocolConfig:
    """The training protocol every cell follows (see :mod:`ctr.sweep.runner`).

    ``grid`` lists explicit points (``{"table_lr": .., "embedding_l2": ..}``, optionally
    ``"table_optimizer"``); when empty the grid is ``table_lrs × embedding_l2s`` at
    ``optimizer``, or, with ``optimizers`` (e.g. ``["rowwise_adagrad", "adam"]``: each method
    can have its paper's optimiser and ``full`` the same chance), each optimiser × its lrs
    (``optimizer_lrs``, else ``table_lrs``) × ``embedding_l2s``. ``batch_size`` 0 picks
    :func:`ctr.training.run.auto_batch_size`.

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any], source: str | None = None) -> ProtocolConfig:
        """``source`` given: an unknown field is an error naming it. Without it (a cell a
        sweep wrote), unknown fields are skipped and a protocol written before the optimiser
        axis trains ``optimizer`` alone, as it did."""
        known = {f.name for f in fields(cls)}
        if source is not None:
            bad = sorted(set(raw) - known)
            if bad:
                raise ValueError(f"{source}: unknown protocol field(s) {bad}")
            return cls(**raw)
        raw = {"optimizers": [], **raw}
        return cls(**{k: v for k, v in raw.items() if k in known})

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

    def effective(self) -> dict[str, Any]:
        """What this protocol trains: every field, the grid as its points and not the
        ``table_lrs``/``embedding_l2s``/``optimizers``/``optimizer_lrs`` that make them."""
        out = asdict(self)
        out["grid"] = self.points()
        del out["table_lrs"], out["embedding_l2s"], out["optimizers"], out["optimizer_lrs"]
        return out

    def train_config(self, point: dict[str, Any], seed: int, batch_size: int) -> Any:
        """The :class:`ctr.training.config.TrainConfig` of one grid point."""
        from ctr.training.trainer import TrainConfig

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


def effective_protocol(protocol: ProtocolConfig | dict[str, Any]) -> dict[str, Any]:
    """:meth:`ProtocolConfig.effective` of a protocol or of one as a cell recorded it
    (defaults filled in for fields written before they existed)."""
    if isinstance(protocol, dict):
        protocol = ProtocolConfig.from_json(protocol)
    return protocol.effective()


def cell_key(cell: Cell | dict[str, Any]) -> str:
    """A stable hash of a cell's config (key order and JSON spelling do not matter)."""
    raw = cell.to_json() if isinstance(cell, Cell) else cell
    blob = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Cell:
    """One dataset × model × method × budget × seed under one protocol."""

    data: str
    model: str
    model_options: dict[str, Any]
    dim: int
    method: str
    budget: Budget
    method_options: dict[str, Any]
    seed: int
    protocol: ProtocolConfig

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "protocol": self.protocol.to_json()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Cell:
        """A ``cell.json`` as any version wrote it."""
        values = {f.name: raw.get(f.name) for f in fields(cls)}
        values["method_options"] = values["method_options"] or {}
        values["protocol"] = ProtocolConfig.from_json(values["protocol"] or {})
        return cls(**values)

    @property
    def key(self) -> str:
        """:func:`cell_key`: names the cell's directory."""
        return cell_key(self)

    @property
    def effective_key(self) -> str:
        """A hash of what the cell actually trains (:meth:`ProtocolConfig.effective`), so
        two cells that differ only in fields an explicit grid overrides (the default
        ``table_lrs``/``embedding_l2s`` of the version that wrote them) hash alike. The
        report counts such twins once; run directories keep :attr:`key`."""
        return cell_key({**self.to_json(), "protocol": self.protocol.effective()})

    def dir_name(self) -> str:
        budget = str(self.budget).replace("/", "_")
        return f"{self.method}-{budget}-{self.model}-seed{self.seed}-{self.key}"


def effective_key(cell: Cell | dict[str, Any]) -> str:
    """:attr:`Cell.effective_key` of a cell or of its JSON."""
    return (cell if isinstance(cell, Cell) else Cell.from_json(cell)).effective_key


def cell_dir(out: str | Path, cell: Cell) -> Path:
    return Path(out) / "cells" / cell.dir_name()


#: What a cell result copies from its chosen grid point's summary.json: every key of
#: :class:`~ctr.training.summary.RunSummary` but the run's identity (the cell names it) and
#: what only the run needs (it stays in the grid point's own summary.json).
SUMMARY_KEYS = tuple(
    k
    for k in RunSummary.keys()
    if k
    not in {
        *("model", "compressor", "budget", "dim", "valid_logloss", "train_parts"),
        *("memory_parts", "batch_size", "world_size", "finished"),
    }
)


@dataclass
class CellResult:
    """A finished cell (``result.json``): ``status`` ``"done"`` (trained; ``summary`` holds
    the chosen grid point's run summary at :data:`SUMMARY_KEYS`, flat in the JSON) or
    ``"infeasible"`` (``reason``).

    ``method_defaults`` (the method's option defaults then; None in results written before
    they were recorded) and ``code_version`` let a later run tell what changed since.
    ``cell`` is not written: :func:`ctr.sweep.report.load_results` attaches the cell's
    ``cell.json``."""

    data: str
    model: str
    method: str
    budget: Budget
    seed: int
    status: str
    key: str
    method_defaults: dict[str, Any] | None = None
    code_version: str | None = None
    reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    chosen: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    grid: list[dict[str, Any]] = field(default_factory=list)
    grid_train_seconds: float | None = None
    cell_seconds: float | None = None
    cell: Cell | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # What a result records of its run summary, and only that.
        self.summary = {k: self.summary.get(k) for k in SUMMARY_KEYS}

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def test_auc(self) -> float | None:
        return self.summary.get("test_auc")

    @property
    def method_options(self) -> dict[str, Any]:
        return self.cell.method_options if self.cell is not None else {}

    @classmethod
    def of(cls, cell: Cell, status: str, **values: Any) -> CellResult:
        return cls(
            data=cell.data,
            model=cell.model,
            method=cell.method,
            budget=cell.budget,
            seed=cell.seed,
            status=status,
            key=cell.key,
            **values,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON as sweeps have always written it (an infeasible result lists no
        training fields)."""
        head = {k: getattr(self, k) for k in ("data", "model", "method", "budget", "seed")}
        head["status"] = self.status
        if not self.done:
            head["reason"] = self.reason
        head |= {
            "key": self.key,
            "method_defaults": self.method_defaults,
            "code_version": self.code_version,
        }
        if not self.done:
            return head
        return (
            head
            | {k: self.summary.get(k) for k in SUMMARY_KEYS}
            | {
                "chosen": self.chosen,
                "batch_size": self.batch_size,
                "grid": self.grid,
                "grid_train_seconds": self.grid_train_seconds,
                "cell_seconds": self.cell_seconds,
            }
        )

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CellResult:
        names = {f.name for f in fields(cls)} - {"summary", "cell"}
        values = {k: raw[k] for k in names if k in raw}
        return cls(**values, summary={k: raw.get(k) for k in SUMMARY_KEYS})

    @classmethod
    def load(cls, path: str | Path) -> CellResult:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class SweepSpec:
    """What to sweep. ``method_options`` maps a method name to its options."""

    data: list[str]
    models: list[str] = field(default_factory=lambda: ["deepfm"])
    methods: list[str] = field(default_factory=lambda: ["full"])
    budgets: list[Budget] = field(default_factory=lambda: ["1x"])
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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown field(s) {unknown}; expected some of {sorted(known)}"
            )
        protocol = ProtocolConfig.from_json(raw.pop("protocol", {}) or {}, source)
        if "data" not in raw:
            raise ValueError(
                f"{source}: field 'data' (a list of prepared dataset dirs) is required"
            )
        for key in ("data", "models", "methods", "budgets", "seeds"):
            if key in raw and not isinstance(raw[key], list):
                raw[key] = [raw[key]]
        return cls(**raw, protocol=protocol)

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

    def cells(self) -> list[Cell]:
        """Every cell (reference ``full`` cells first), in a stable order."""
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
        return [
            Cell(
                data=str(d),
                model=m,
                model_options=self.model_options,
                dim=self.dim,
                method=method,
                budget=budget,
                method_options=self.method_options.get(method, {}),
                seed=seed,
                protocol=self.protocol,
            )
            for d, m, method, budget, seed in dict.fromkeys(combos)
        ]
