"""What defines a run: :class:`TrainConfig` (optimisation) and :class:`RunConfig` (data,
model, method, budget), and the one place their ``"auto"`` defaults are resolved.

A run's table optimiser defaults to ``"auto"``: the method's own
(:attr:`~compressors.core.base.Compressor.default_optimizer`: fbgemm's rowwise Adagrad, or
Adam for the methods whose criteria need it), at :data:`DEFAULT_TABLE_LRS`'s learning rate
when ``table_lr`` is None. :func:`resolve_table_optimizer` decides both, for the Python API,
``ctr train`` and a run's ``config.json`` alike; the sweep protocol names its optimiser and
learning rates explicitly.

Example::

    cfg = RunConfig(data="data/synth", model="deepfm", compressor="pep", budget="10x")
    cfg.resolved().train.table_optimizer   # "adam" (PEP's own), table_lr 1e-3
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from compressors.core.base import PlanContext
from ctr.training.device import check_device

#: Each table optimiser's learning rate when a run leaves it to the defaults: Adam's scale is
#: not the Adagrad family's.
DEFAULT_TABLE_LRS = {"rowwise_adagrad": 0.05, "adagrad": 0.05, "sgd": 0.05, "adam": 1e-3}

#: The table optimiser of a method the registry does not know (fbgemm's default).
FALLBACK_OPTIMIZER = "rowwise_adagrad"


def resolve_table_optimizer(
    compressor: str | type | None, optimizer: str = "auto", lr: float | None = None
) -> tuple[str, float]:
    """``(optimizer, lr)`` with ``"auto"`` and None resolved: ``"auto"`` is the method's
    ``default_optimizer`` (``compressor`` a registered name or a Compressor class), and None
    the optimiser's entry in :data:`DEFAULT_TABLE_LRS`."""
    if optimizer == "auto":
        method = compressor
        if isinstance(compressor, str):
            from compressors.core.registry import COMPRESSORS

            method = COMPRESSORS.get(compressor)
        optimizer = getattr(method, "default_optimizer", None) or FALLBACK_OPTIMIZER
    if lr is None:
        if optimizer not in DEFAULT_TABLE_LRS:
            raise ValueError(
                f"--table-optimizer must be auto or one of {', '.join(DEFAULT_TABLE_LRS)}, "
                f"got {optimizer!r}"
            )
        lr = DEFAULT_TABLE_LRS[optimizer]
    return optimizer, lr


@dataclass
class TrainConfig:
    """Optimisation settings. ``epochs`` may be fractional; ``eval_every=0`` evaluates
    ``evals_per_epoch`` times per epoch (0: once); ``max_steps`` stops (and checkpoints) after
    that many steps in total.

    Embedding parameters: tables train with ``table_optimizer`` at ``table_lr`` (``"auto"``
    and None: the method's own optimiser at its default rate, see
    :func:`resolve_table_optimizer`). ``module_optimizer="method"`` lets a method's embedding
    modules (TT cores, ROBE array, DHE network) use the optimizer the method declares;
    ``"table"`` trains them with the tables' optimizer family and learning rate (the
    fair-comparison protocol, ``ctr.sweep``). ``embedding_l2`` is decoupled weight decay on
    every embedding parameter (``l2_mode`` ``"lazy"`` at sparse cost or the exact ``"dense"``
    reference; see :mod:`compressors.core.decay`). ``lr_decay`` < 1 multiplies the embedding
    learning rates each time an evaluation does not improve (decay on plateau). ``device``:
    where a single-process run computes (``auto``: CUDA when present; :mod:`ctr.training.device`);
    a run may resume on another device.
    """

    epochs: float = 1.0
    batch_size: int = 4096
    lr: float = 1e-3
    table_lr: float | None = None
    table_optimizer: str = "auto"
    weight_decay: float = 0.0
    eval_every: int = 0
    patience: int = 2
    evals_per_epoch: int = 0
    module_optimizer: str = "method"
    embedding_l2: float = 0.0
    l2_mode: str = "lazy"
    lr_decay: float = 1.0
    restore_best: bool = True
    checkpoint_every: int = 500
    seed: int = 0
    max_steps: int | None = None
    eval_batch_size: int = 16384
    progress: bool = True
    device: str = "auto"

    def resolved(self, compressor: str | type | None) -> TrainConfig:
        """This config with ``table_optimizer`` and ``table_lr`` resolved for ``compressor``
        (see :func:`resolve_table_optimizer`)."""
        optimizer, lr = resolve_table_optimizer(compressor, self.table_optimizer, self.table_lr)
        return replace(self, table_optimizer=optimizer, table_lr=lr)

    def validate(self) -> None:
        """Refuses settings that cannot train, naming the ``ctr train`` flag."""
        lr_ok = self.table_lr is None or 0 < self.table_lr < math.inf
        checks = [
            ("--epochs", self.epochs, self.epochs > 0, "a positive number (fractions allowed)"),
            ("--batch-size", self.batch_size, self.batch_size >= 1, "a positive integer"),
            ("--lr", self.lr, 0 < self.lr < math.inf, "a positive finite number"),
            ("--table-lr", self.table_lr, lr_ok, "a positive finite number"),
            ("--eval-every", self.eval_every, self.eval_every >= 0, "0 (per epoch) or more"),
            ("--patience", self.patience, self.patience >= 1, "a positive integer"),
            (
                "--max-steps",
                self.max_steps,
                self.max_steps is None or self.max_steps >= 1,
                "a positive integer",
            ),
        ]
        for flag, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"{flag} must be {expected}, got {value}")
        check_device(self.device)


class RunError(RuntimeError):
    """A run directory that cannot be used as asked."""


@dataclass
class RunConfig:
    """Everything that defines a run; saved as ``config.json`` (resolved: the table
    optimiser and its learning rate as the run used them)."""

    data: str
    model: str = "deepfm"
    model_options: dict[str, Any] = field(default_factory=dict)
    dim: int = 16
    compressor: str = "full"
    budget: str | int | float = "1x"
    method_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The dataset's vocabulary identity (DatasetMeta.vocabulary()) when training started;
    # recorded by train_run, checked on resume and export.
    vocabulary: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def resolved(self) -> RunConfig:
        """This config with the table optimiser's ``"auto"``/None resolved for its method."""
        return replace(self, train=self.train.resolved(self.compressor))

    def plan_context(self) -> PlanContext:
        """The plan inputs this run's (resolved) training choices make: the table optimizer,
        and the embedding modules' (Adam, or the tables' family under the protocol)."""
        train = self.train
        module = train.table_optimizer if train.module_optimizer == "table" else "adam"
        return PlanContext(table_optimizer=train.table_optimizer, module_optimizer=module)

    def validate(self) -> None:
        """Refuses settings that cannot train, naming the ``ctr train`` flag."""
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"--dim must be a positive integer, got {self.dim}")
        self.train.validate()

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunConfig:
        raw = dict(raw)
        raw["train"] = TrainConfig(**raw.get("train", {}))
        return cls(**raw)

    @classmethod
    def load(cls, run_dir: str | Path) -> RunConfig:
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise RunError(f"{run_dir}: not a run directory (no config.json)")
        raw = read_config(path)
        try:
            return cls.from_json(raw)
        except TypeError as e:
            raise RunError(f"{path}: not a run config ({e})") from e


def read_config(path: Path) -> dict[str, Any]:
    """A run's ``config.json`` as a dict, or a RunError naming the file and line."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(raw, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw
