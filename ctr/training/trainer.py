"""One trainer for every method: stages, fused tables, early stopping, exact resume.

Physical tables train inside fbgemm (a fused optimizer in the backward pass: rowwise Adagrad
by default; on CPU fbgemm offers SGD, Adagrad and rowwise Adagrad, not Adam); a method's own
parameter groups use the optimizer it declares, all other parameters Adam. Embedding
parameters (tables and groups flagged ``embedding``) can get decoupled L2 (``embedding_l2``;
lazy per row on fused tables) and plateau lr decay; ``module_optimizer="table"`` trains
embedding groups with the tables' optimizer family and lr (the fair-comparison protocol).
Single-process runs swap each EBC for a ``FusedEmbeddingBagCollection``; under ``torchrun``
the model is wrapped in TorchRec's DMP instead (``ctr.training.distributed``).

The run directory receives ``config.json`` (written by the caller), ``metrics.jsonl`` (one
line per evaluation), ``checkpoint.pt`` (atomic; everything needed to continue exactly),
``best.pt`` (best validation weights), ``model.pt`` (final weights, what ``ctr export``
reads) and, when a stage rewinds, ``initial.pt`` (the weights at step 0). All ``.pt`` files
load with ``torch.load(weights_only=True)`` and hold whole (unsharded) tensors, so a DMP run's
files read like a single process's. After a stage that changes shapes, ``model.pt`` and the
checkpoint carry the compressor's architecture record under :data:`ARCHITECTURE_KEY`.

The trainer implements the compressors' :class:`~compressors.core.base.StageContext` (as
:class:`RunContext`) and honours each :class:`~compressors.core.base.Stage`'s flags: gradient
stages or the method's own procedure, bilevel alternation of training and validation
batches, a frozen dense network, rewinds to the initial weights, and rebuilds.

Example::

    trainer = Trainer(model, train_loader, valid_loader, TrainConfig(epochs=2), run_dir="runs/a")
    summary = trainer.fit()          # resumes from runs/a/checkpoint.pt when present
    trainer.evaluate(test_loader)    # {"auc": ..., "logloss": ...}
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._shard.sharded_tensor import ShardedTensor

from compressors.core.base import Compressor, Stage
from compressors.core.decay import EmbeddingRows
from compressors.core.optim import RowwiseAdagrad
from compressors.core.storage import TrainTables
from ctr.models.base import CTRModel
from ctr.training.distributed import (
    DistInfo,
    ShardedTableOptimizer,
    dense_parameters,
    full_state_dict,
    load_full_state_dict,
    shard_model,
)
from ctr.training.metrics import auc_logloss
from datasets.loader import PAD_LABEL, BatchLoader
from datasets.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings. ``epochs`` may be fractional; ``eval_every=0`` evaluates
    ``evals_per_epoch`` times per epoch (0: once); ``max_steps`` stops (and checkpoints) after
    that many steps in total.

    Embedding parameters: tables train with ``table_optimizer`` at ``table_lr``.
    ``module_optimizer="method"`` lets a method's embedding modules (TT cores, ROBE array, DHE
    network) use the optimizer the method declares; ``"table"`` trains them with the tables'
    optimizer family and learning rate (the fair-comparison protocol, ``ctr.sweep``).
    ``embedding_l2`` is decoupled weight decay on every embedding parameter (``l2_mode``
    ``"lazy"`` at sparse cost or the exact ``"dense"`` reference; see
    :mod:`compressors.core.decay`). ``lr_decay`` < 1 multiplies the embedding learning rates
    each time an evaluation does not improve (decay on plateau).
    """

    epochs: float = 1.0
    batch_size: int = 4096
    lr: float = 1e-3
    table_lr: float = 0.05
    table_optimizer: str = "rowwise_adagrad"
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

    def validate(self) -> None:
        """Refuses settings that cannot train, naming the ``ctr train`` flag."""
        checks = [
            ("--epochs", self.epochs, self.epochs > 0, "a positive number (fractions allowed)"),
            ("--batch-size", self.batch_size, self.batch_size >= 1, "a positive integer"),
            ("--lr", self.lr, 0 < self.lr < math.inf, "a positive finite number"),
            ("--table-lr", self.table_lr, 0 < self.table_lr < math.inf, "a positive finite number"),
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


class TrainingDiverged(RuntimeError):
    """The training loss stopped being a finite number."""


class LossCheck:
    """Watches a stage's training loss: a NaN or infinite loss stops the run at that step
    (every later step would train on garbage, and the final metrics would fail far from the
    cause; the last checkpoint stays as it was); a loss averaging over 4x what a constant 0.5
    prediction costs for ``window`` steps is diverging, and says so once."""

    WORSE_THAN_CONSTANT = 4.0

    def __init__(self, config: TrainConfig, window: int = 20) -> None:
        self.config, self.window = config, window
        self.total, self.count, self.warned = 0.0, 0, False

    def __call__(self, loss: float, step: int, stage: str) -> None:
        cfg = self.config
        flags = f"lower --lr ({cfg.lr:g}) or --table-lr ({cfg.table_lr:g})"
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss} at step {step} (stage {stage!r}): the run "
                f"diverged; {flags} and train into a new --out (or pass --overwrite)"
            )
        self.total, self.count = self.total + loss, self.count + 1
        if self.count < self.window:
            return
        mean, self.total, self.count = self.total / self.count, 0.0, 0
        if not self.warned and mean > self.WORSE_THAN_CONSTANT * math.log(2):
            self.warned = True
            print(
                f"warning: the training loss averaged {mean:.3g} over steps "
                f"{step - self.window + 1}-{step} (stage {stage!r}), over "
                f"{self.WORSE_THAN_CONSTANT:g}x what predicting 0.5 costs ({math.log(2):.3f}): "
                f"the run is diverging; {flags}",
                file=sys.stderr,
            )


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    stage: int = 0
    stage_started: bool = False
    epoch: int = 0
    batch: int = 0
    stage_step: int = 0
    step: int = 0
    best_auc: float = -math.inf
    bad_evals: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    lr_scale: float = 1.0
    finished: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    architecture: dict[str, Any] | None = None


ARCHITECTURE_KEY = "__architecture__"


class RunContext:
    """The trainer's :class:`~compressors.core.base.StageContext` for one stage."""

    def __init__(self, trainer: Trainer, stage: Stage, resumed: bool) -> None:
        self.trainer = trainer
        self.stage = stage
        self.resumed = resumed
        self.seed = trainer.config.seed
        self.embedding_l2 = trainer.config.embedding_l2
        self.batch: Any = None

    @property
    def table_lr(self) -> float:
        return self.trainer.embedding_lr

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.net

    @property
    def step(self) -> int:
        return self.trainer.state.step

    @property
    def stage_step(self) -> int:
        return self.trainer.state.stage_step

    @property
    def stage_steps(self) -> int:
        return self.trainer._stage_steps(self.stage)

    def loss(self, batch: Any) -> torch.Tensor:
        return self.trainer.loss(batch)

    def train_batches(self) -> Iterator:
        epoch = 0
        while True:
            # Seeds apart from the training stages' epochs (which use epoch + 1000 * stage).
            yield from self.trainer.train.epoch(10**6 + 1000 * self.trainer.state.stage + epoch)
            epoch += 1

    def valid_batches(self) -> Iterator:
        return self.trainer.valid_batches()

    def evaluate(self, split: str = "valid", max_batches: int | None = None) -> dict[str, float]:
        loaders = {"valid": self.trainer.valid, "train": self.trainer.train}
        if split not in loaders:
            raise ValueError(f"evaluate: split must be one of {sorted(loaders)}, got {split!r}")
        return self.trainer.evaluate(loaders[split], max_batches=max_batches)

    def progress(self, total: int, desc: str) -> Any:
        # A stage's own loop (a search's generations): a line each, even without bars.
        return self.trainer.progress(total, desc, quiet="each")

    def checkpoint(self, state: dict[str, Any]) -> None:
        self.trainer.stage_state = state
        self.trainer._checkpoint()

    def restored_state(self) -> dict[str, Any] | None:
        return self.trainer.stage_state if self.resumed else None

    def initial_state(self) -> dict[str, torch.Tensor]:
        return self.trainer.initial_state()

    def rng(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1009 + self.trainer.state.stage)


# Optimizers a compressor's parameter group may ask for (and the protocol's module families).
OPTIMIZERS: dict[str, Any] = {
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowwiseAdagrad,
}


#: Each table optimiser's learning rate when a run leaves it to the defaults: Adam's scale is
#: not the Adagrad family's.
DEFAULT_TABLE_LRS = {"rowwise_adagrad": 0.05, "adagrad": 0.05, "sgd": 0.05, "adam": 1e-3}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def table_modules(model: torch.nn.Module) -> list[TrainTables]:
    return [m for m in model.modules() if isinstance(m, TrainTables)]


def embedding_rows(model: torch.nn.Module) -> list[EmbeddingRows]:
    """Modules holding embedding rows that take the run's decoupled L2: TorchRec tables and
    a method's own row tables (the pruning family's)."""
    return [m for m in model.modules() if isinstance(m, EmbeddingRows)]


class Trainer:
    """Runs a model's compressor stages in order (see module docstring)."""

    def __init__(
        self,
        model: CTRModel,
        train: BatchLoader,
        valid: BatchLoader,
        config: TrainConfig | None = None,
        run_dir: str | os.PathLike | None = None,
        dist_info: DistInfo | None = None,
    ) -> None:
        self.model = model
        self.train = train
        self.valid = valid
        self.config = config or TrainConfig()
        self.run_dir = Path(run_dir) if run_dir else None
        self.dist = dist_info
        self.state = TrainState()
        self.stage_state: dict[str, Any] | None = None
        self._best: dict[str, torch.Tensor] | None = None
        self._initial: dict[str, torch.Tensor] | None = None
        self.compressor: Compressor = model.embedding.compressor
        self.compressor.table_optimizer = self.config.table_optimizer
        # Architecture steps from the validation split (the papers), or from a held-out
        # share of the training split that no stage then trains on (the validation split
        # stays unseen, for early stopping and the sweep's choice of learning rate).
        self.search = valid
        holdout = self.compressor.search_holdout
        if holdout and any(s.bilevel for s in self.compressor.stages):
            self.train = train.share(0.0, 1.0 - holdout)
            self.search = train.share(1.0 - holdout, 1.0)
        if self.config.module_optimizer not in ("method", "table"):
            raise ValueError(
                "module_optimizer must be 'method' or 'table', "
                f"got {self.config.module_optimizer!r}"
            )
        if dist_info is not None:
            if self.config.embedding_l2:
                raise RuntimeError("embedding_l2 runs in a single process only (not under DMP)")
            # Bilevel and reshaping stages, and a method's own procedures (searches,
            # quantisation passes: they read whole tables that DMP holds as shards), run in
            # one process only; refusing beats hanging in a collective.
            special = [
                s.name for s in self.compressor.stages if s.bilevel or s.rebuilds or not s.trains
            ]
            if special:
                raise RuntimeError(
                    f"{self.compressor.name}: stages {special} (bilevel, reshaping or the "
                    "method's own procedure) run in a single process only; train it without "
                    "torchrun"
                )
            self.net: torch.nn.Module = shard_model(
                model, dist_info, self.config.table_optimizer, self.config.table_lr
            )
        else:
            self.net = model
        self._setup_optimizers()
        if self.run_dir and self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def main(self) -> bool:
        return self.dist is None or self.dist.is_main

    # ---------------------------------------------------------------- optimisers
    def _setup_optimizers(self) -> None:
        """Fuses the tables (single process) and builds every optimizer afresh."""
        cfg = self.config
        if self.dist is None:
            for tables in table_modules(self.model):
                tables.fuse(cfg.table_optimizer, cfg.table_lr)
            for rows in embedding_rows(self.model):
                rows.use_optimizer(cfg.table_optimizer)
                rows.set_weight_decay(cfg.embedding_l2, cfg.l2_mode)
            fused = {id(p) for t in table_modules(self.model) for p in t.parameters()}
            dense = [p for p in self.model.parameters() if p.requires_grad and id(p) not in fused]
        else:
            dense = dense_parameters(self.net)
        self.optimizers, self.valid_optimizers = self._build_optimizers(dense)
        # Fused table optimizers step inside fbgemm's backward; they are only checkpointed.
        self.table_optimizers: dict[str, Any] = (
            {f"tables{i}": t.table_optimizer() for i, t in enumerate(table_modules(self.model))}
            if self.dist is None
            else {"tables": ShardedTableOptimizer(self.net)}
        )
        self._apply_lr_scale()

    def _build_optimizers(
        self, dense: list[torch.nn.Parameter]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(optimizers stepped on training batches, those stepped on validation batches)."""
        cfg = self.config
        train: dict[str, Any] = {}
        valid: dict[str, Any] = {}
        claimed: set[int] = set()
        self.embedding_groups: list[str] = []
        for i, group in enumerate(self.compressor.optimizer_groups()):
            params = [p for p in group["params"] if p.requires_grad]
            claimed |= {id(p) for p in params}
            kind, role = group.get("optimizer", "adam"), group.get("role", "train")
            if kind not in OPTIMIZERS or role not in ("train", "valid"):
                raise ValueError(
                    f"{self.compressor.name}: optimizer group {i} has optimizer {kind!r} and "
                    f"role {role!r}; expected {'|'.join(OPTIMIZERS)} and train|valid"
                )
            lr = group.get("lr") or cfg.lr
            wd = group.get("weight_decay", 0.0)
            if group.get("embedding") and role == "train":
                # Embedding parameters: decoupled L2 and plateau decay like the tables; under
                # the protocol also the tables' optimizer family and learning rate.
                self.embedding_groups.append(f"compressor{i}")
                if cfg.module_optimizer == "table":
                    kind, lr = cfg.table_optimizer, cfg.table_lr
            opt = OPTIMIZERS[kind](params, lr=lr, weight_decay=wd)
            for g in opt.param_groups:
                g["base_lr"] = lr
            (valid if role == "valid" else train)[f"compressor{i}"] = opt
        rest = [p for p in dense if id(p) not in claimed]
        train["dense"] = torch.optim.Adam(rest, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return train, valid

    def _all_optimizers(self) -> dict[str, Any]:
        return {**self.optimizers, **self.valid_optimizers, **self.table_optimizers}

    def _apply_lr_scale(self) -> None:
        """Embedding learning rates = their base rates x ``state.lr_scale`` (plateau decay)."""
        scale = self.state.lr_scale
        if self.dist is None:
            for opt in self.table_optimizers.values():
                for g in opt.param_groups:
                    g["lr"] = self.config.table_lr * scale
                opt.step()  # a fused optimizer hands its lr to fbgemm on step()/zero_grad()
        for name in self.embedding_groups:
            for g in self.optimizers[name].param_groups:
                g["lr"] = g["base_lr"] * scale

    @property
    def embedding_lr(self) -> float:
        """The embedding learning rate now: the table lr times the plateau decay."""
        return self.config.table_lr * self.state.lr_scale

    def decay_state_bytes(self) -> int:
        """Bytes lazy embedding L2 keeps beside the tables (0 without it)."""
        return sum(m.decay.state_bytes() for m in embedding_rows(self.model) if m.decay is not None)

    def _decay_embeddings(self) -> None:
        """Decoupled embedding L2 after a step: tables (lazy/dense) and embedding modules."""
        cfg = self.config
        if not cfg.embedding_l2 or self.dist is not None:
            return
        for rows in embedding_rows(self.model):
            if rows.decay is not None:
                rows.decay.advance(self.embedding_lr)
        with torch.no_grad():
            for name in self.embedding_groups:
                for g in self.optimizers[name].param_groups:
                    for p in g["params"]:
                        p.mul_(1.0 - g["lr"] * cfg.embedding_l2)

    # ---------------------------------------------------------------- training
    def fit(self) -> dict[str, Any]:
        """Runs (or resumes) every stage; returns the training record."""
        self._resume()
        stages = self.compressor.stages
        while self.state.stage < len(stages) and not self._out_of_steps():
            stage = stages[self.state.stage]
            resumed = self.state.stage_started
            if not resumed:
                self.state.stage_started = True
                self.state.epoch = self.state.batch = self.state.stage_step = 0
                self.state.best_auc, self.state.bad_evals = -math.inf, 0
                self.stage_state = None
                self._best = None
                # Each stage starts at the base embedding lr: a pruning stage's dips in
                # validation AUC must not slow the retraining that follows.
                self.state.lr_scale = 1.0
                self._apply_lr_scale()
                if stage.rewind:
                    self._rewind()
            started = time.perf_counter()
            ctx = RunContext(self, stage, resumed)
            self.compressor.on_stage_start(stage, ctx)
            if stage.trains:
                done = self._train_stage(stage, ctx)
                if not done:
                    break
            else:
                self._flush_decay()  # a method's own procedure reads its tables whole
                self.compressor.run_stage(stage, ctx)
            self._flush_decay()
            self.compressor.on_stage_end(stage, ctx)
            if stage.rebuilds:
                self.state.architecture = self.compressor.architecture()
                self._setup_optimizers()
            seconds = self.state.stage_seconds
            seconds[stage.name] = seconds.get(stage.name, 0.0) + time.perf_counter() - started
            self._log_stage(stage, seconds[stage.name])
            self.state.stage += 1
            self.state.stage_started = False
            self.stage_state = None
            self._checkpoint()
        self.state.finished = self.state.stage >= len(stages)
        if self.state.finished:
            self._save_model("model.pt")
        return {
            "finished": self.state.finished,
            "steps": self.state.step,
            "samples_per_sec": self.state.samples / max(self.state.train_seconds, 1e-9),
            "stage_seconds": dict(self.state.stage_seconds),
            "history": self.state.history,
        }

    def _log_stage(self, stage: Stage, seconds: float) -> None:
        """One log line per finished stage: its wall time (also in the summary)."""
        if self.main:
            log.info("stage %s done in %.1f s (step %d)", stage.name, seconds, self.state.step)

    def _stage_steps(self, stage: Stage) -> int:
        epochs = stage.epochs if stage.epochs is not None else self.config.epochs
        return max(1, math.ceil(epochs * len(self.train)))

    def _out_of_steps(self) -> bool:
        return self.config.max_steps is not None and self.state.step >= self.config.max_steps

    def progress(self, total: int, desc: str, initial: int = 0, quiet: str = "ends") -> Any:
        """A bar on a terminal, lines in a log; without bars, a line as each stage starts and
        ends (``quiet``) so a long run is never silent."""
        return progress_bar(
            total,
            desc,
            unit="steps",
            show=self.config.progress and self.main,
            initial=initial,
            quiet=quiet if self.main else "none",  # type: ignore[arg-type]
            dynamic_ncols=True,
        )

    def _train_stage(self, stage: Stage, ctx: RunContext) -> bool:
        """Trains until the stage's steps run out or early stopping; False if interrupted."""
        cfg, st = self.config, self.state
        total = self._stage_steps(stage)
        per_epoch = len(self.train)
        eval_every = cfg.eval_every or (
            math.ceil(per_epoch / cfg.evals_per_epoch) if cfg.evals_per_epoch else per_epoch
        )
        bar = self.progress(total, stage.name, initial=st.stage_step)
        # A bilevel stage reads validation batch k after training batch k (k counts the
        # stage's steps), so a resumed stage continues the alternation exactly.
        valid = self.valid_batches(start=st.stage_step) if stage.bilevel else None
        stopped = False
        check_loss = LossCheck(cfg)
        try:
            while st.stage_step < total and not stopped:
                batches = self.train.epoch(self._epoch_seed(st.epoch), start_batch=st.batch)
                tick = time.perf_counter()
                for batch in batches:
                    loss = self.train_step(batch, dense=stage.dense)
                    check_loss(loss, st.step + 1, stage.name)
                    if valid is not None:
                        self.valid_step(next(valid))
                    ctx.batch = batch
                    self.compressor.after_step(ctx)
                    st.batch += 1
                    st.stage_step += 1
                    st.step += 1
                    st.samples += len(batch.labels) * (self.dist.world_size if self.dist else 1)
                    bar.update(1)
                    if st.step % 20 == 0:
                        bar.set_postfix(loss=f"{loss:.4f}")
                    end_of_epoch = st.batch == per_epoch
                    evaluate = (
                        st.stage_step % eval_every == 0 or end_of_epoch or st.stage_step == total
                    )
                    interrupted = self._out_of_steps()
                    if evaluate or interrupted or st.step % cfg.checkpoint_every == 0:
                        st.train_seconds += time.perf_counter() - tick
                        if evaluate:
                            stopped = self._evaluate_and_track(stage) and stage.early_stop
                        if end_of_epoch:
                            st.epoch, st.batch = st.epoch + 1, 0
                        self._checkpoint()
                        tick = time.perf_counter()
                    if interrupted:
                        return False
                    if stopped or st.stage_step >= total or end_of_epoch:
                        break
                else:
                    st.train_seconds += time.perf_counter() - tick
        finally:
            bar.close()
        if cfg.restore_best and stage.restore_best:
            self._restore_best()
        return True

    def _epoch_seed(self, epoch: int) -> int:
        return epoch + 1000 * self.state.stage

    def valid_batches(self, start: int = 0) -> Iterator:
        """Endless shuffled validation batches of the *training* batch size, from the
        ``start``-th one on: a bilevel stage's architecture steps (from the held-out share
        of the training split instead, when the method sets ``search_holdout``).

        DARTS-style searches (DNIS's official code, AutoDim) draw the validation batch of
        each architecture step like the training batch — same size, shuffled. The
        evaluation loader's batches (``eval_batch_size``, 16384) would make every α step
        32x a training step's work at batch 512 and average its gradient over 32x the
        samples. Seeded by the run, the stage and the pass over the split, so a resumed
        stage draws the same batches."""
        size = self.train.batch_size
        stream = self.search.resized(size, shuffle=True, drop_last=self.search.rows >= size)
        per_epoch = max(len(stream), 1)
        epoch, skip = divmod(start, per_epoch)
        while True:
            yield from stream.epoch(2 * 10**6 + 1000 * self.state.stage + epoch, skip)
            epoch, skip = epoch + 1, 0

    def loss(self, batch: Any) -> torch.Tensor:
        """Mean BCE of the model's logits on ``batch`` (the data loss, no penalty)."""
        logits = self.net(batch.dense_features, batch.sparse_features)
        return F.binary_cross_entropy_with_logits(logits, batch.labels)

    def train_step(self, batch: Any, dense: bool = True) -> float:
        """One optimisation step on ``batch``; returns the data loss.

        Fused tables update inside the backward pass; ``dense=False`` leaves the dense
        network's Adam unstepped (its gradients are discarded at the next step).
        """
        self.net.train()
        loss = self.loss(batch)
        total = loss + self.compressor.penalty()
        for opt in self.optimizers.values():
            opt.zero_grad()
        total.backward()
        for name, opt in self.optimizers.items():
            if dense or name != "dense":
                opt.step()
        for rows in embedding_rows(self.model):
            rows.step_rows(self.embedding_lr)
        self._decay_embeddings()
        return loss.item()

    def valid_step(self, batch: Any) -> float:
        """A bilevel stage's architecture step: only ``"valid"`` groups learn from ``batch``.

        The backward pass runs only towards those parameters, so fused tables (which update
        inside their own backward) and the network are left untouched.
        """
        params = [
            p
            for opt in self.valid_optimizers.values()
            for g in opt.param_groups
            for p in g["params"]
        ]
        if not params:
            return 0.0
        self.net.train()
        loss = self.loss(batch)
        for opt in self.valid_optimizers.values():
            opt.zero_grad()
        (loss + self.compressor.penalty()).backward(inputs=params)
        for opt in self.valid_optimizers.values():
            opt.step()
        return loss.item()

    def _evaluate_and_track(self, stage: Stage) -> bool:
        """Validation AUC/logloss, best-weights tracking; True when patience ran out."""
        st = self.state
        metrics = self.evaluate(self.valid)
        improved = metrics["auc"] > st.best_auc
        if improved:
            st.best_auc, st.bad_evals = metrics["auc"], 0
            if stage.restore_best and self.config.restore_best:
                self._save_model("best.pt")
        else:
            st.bad_evals += 1
            # Plateau decay belongs to early stopping: a scheduled stage keeps its lr.
            if self.config.lr_decay < 1.0 and stage.early_stop:
                st.lr_scale *= self.config.lr_decay
                self._apply_lr_scale()
        record = {
            "stage": stage.name,
            "step": st.step,
            "epoch": st.epoch,
            "valid_auc": metrics["auc"],
            "valid_logloss": metrics["logloss"],
            "lr_scale": st.lr_scale,
        }
        st.history.append(record)
        if self.run_dir and self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return st.bad_evals >= self.config.patience

    # ---------------------------------------------------------------- rewinds
    def initial_state(self) -> dict[str, torch.Tensor]:
        """The model's weights at step 0 (kept in memory, or read from ``initial.pt``)."""
        if self._initial is None:
            path = self.run_dir / "initial.pt" if self.run_dir else None
            if path is None or not path.exists():
                raise RuntimeError(
                    "the initial weights were not saved: only runs with a rewinding stage keep them"
                )
            self._initial = load_weights(path, "initial weights")
        return self._initial

    def _rewind(self) -> None:
        """Every weight back to step 0, but the compressor's ``rewind_keep()`` entries;
        optimizer states start afresh (a lottery-ticket restart)."""
        current = self.full_state()
        prefix = _prefix_of(self.model, self.compressor)
        keep = [prefix + k for k in self.compressor.rewind_keep()]
        initial = self.initial_state()
        # The compressor fits its own step-0 weights to shapes a rebuild may have changed.
        own = self.compressor.rewind_state(
            {k[len(prefix) :]: v for k, v in initial.items() if k.startswith(prefix)}
        )
        initial = {k: v for k, v in initial.items() if not k.startswith(prefix)}
        initial.update({prefix + k: v for k, v in own.items()})
        state = {
            k: current[k] if any(k.startswith(p) for p in keep) else v for k, v in initial.items()
        }
        self._load_weights(state)
        # Fused table optimizers keep their state in place: zero it (rowwise Adagrad's
        # accumulators start at zero); the other optimizers are built anew.
        for tables in self.table_optimizers.values():
            live = tables.optimizer if isinstance(tables, ShardedTableOptimizer) else tables
            _zero_tensors(live.state_dict()["state"])
        for tables in table_modules(self.model):
            if tables.sparse_optimizer is not None:  # its step counts start afresh too
                tables.reset_optimizer(self.config.table_optimizer, self.config.table_lr)
        self._setup_optimizers()

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, loader: BatchLoader, max_batches: int | None = None) -> dict[str, float]:
        """AUC and logloss over ``loader`` (all ranks' predictions pooled under DMP)."""
        self.net.eval()
        probs, labels = [], []
        for i, batch in enumerate(loader.epoch(0)):
            if max_batches is not None and i >= max_batches:
                break
            probs.append(torch.sigmoid(self.net(batch.dense_features, batch.sparse_features)))
            labels.append(batch.labels)
        p, y = torch.cat(probs), torch.cat(labels)
        if self.dist is not None:
            p, y = _all_gather_cat(p), _all_gather_cat(y)
        keep = y != PAD_LABEL
        return auc_logloss(y[keep].numpy(), p[keep].numpy())

    def predict(self, loader: BatchLoader) -> np.ndarray:
        self.net.eval()
        with torch.no_grad():
            return torch.cat(
                [
                    torch.sigmoid(self.net(b.dense_features, b.sparse_features))
                    for b in loader.epoch(0)
                ]
            ).numpy()

    # ---------------------------------------------------------------- persistence
    def full_state(self) -> dict[str, torch.Tensor]:
        """Unsharded weights (a copy), on every rank."""
        if self.dist is None:
            self._flush_decay()
            # Extra state (get_extra_state) may hold plain values beside the tensors.
            return {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for k, v in self.model.state_dict().items()
            }
        return full_state_dict(self.net)

    def _flush_decay(self) -> None:
        """Lazily decayed rows brought up to date (before the weights are read whole)."""
        for rows in embedding_rows(self.model):
            rows.flush_decay()

    def _load_weights(self, state: dict[str, Any]) -> None:
        if self.dist is None:
            self.model.load_state_dict(state)
            for rows in embedding_rows(self.model):
                if rows.decay is not None:
                    rows.decay.reset()
        else:
            load_full_state_dict(self.net, state)

    def _save_model(self, name: str) -> None:
        state = self.full_state()
        if self.run_dir and self.main:
            saved = state
            if self.state.architecture is not None:
                saved = {**state, ARCHITECTURE_KEY: json.dumps(self.state.architecture)}
            _atomic_save(saved, self.run_dir / name)
        if name == "best.pt":
            self._best = state

    def _restore_best(self) -> None:
        best = self._best
        if best is None and self.run_dir and (self.run_dir / "best.pt").exists():
            best = load_weights(self.run_dir / "best.pt", "best weights")
            best.pop(ARCHITECTURE_KEY, None)
        if best is None:
            return
        # Weights only: the architecture the stage ended with stays (masks, thresholds, α).
        prefix = _prefix_of(self.model, self.compressor)
        keep = [prefix + k for k in self.compressor.architecture_state()]
        if keep:
            current = self.full_state()
            best = {
                k: current[k] if any(k.startswith(p) for p in keep) else v for k, v in best.items()
            }
        self._load_weights(best)

    def _save_initial(self) -> None:
        """Keeps the step-0 weights when a stage will rewind to them."""
        if not any(s.rewind for s in self.compressor.stages):
            return
        self._initial = self.full_state()
        if self.run_dir and self.main:
            _atomic_save(self._initial, self.run_dir / "initial.pt")

    def _checkpoint(self) -> None:
        """Everything needed to continue exactly; under DMP gathered whole (collective)."""
        if not self.run_dir:
            return
        payload = {
            "model": self.full_state(),
            "optimizers": {k: o.state_dict() for k, o in self._all_optimizers().items()},
            "state": asdict(self.state),
            "stage_state": self.stage_state,
            "torch_rng": _rng_states(self.dist),
            "world_size": self.dist.world_size if self.dist else 1,
        }
        if self.main:
            _atomic_save(payload, self.run_dir / "checkpoint.pt")

    def _resume(self) -> None:
        path = self.run_dir / "checkpoint.pt" if self.run_dir else None
        if path is None or not path.exists():
            seed_everything(self.config.seed)
            self._save_initial()
            return
        payload = load_weights(path, "checkpoint")
        world = self.dist.world_size if self.dist else 1
        if payload["world_size"] != world:
            raise RuntimeError(
                f"{path} was written by {payload['world_size']} process(es); resume it with "
                f"the same number (now {world})"
            )
        state = TrainState(**payload["state"])
        if state.architecture is not None:
            self.compressor.rebuild(state.architecture)
            self._setup_optimizers()
        self._load_weights(payload["model"])
        for k, opt in self._all_optimizers().items():
            opt.load_state_dict(payload["optimizers"][k])
        self.state = state
        self._apply_lr_scale()
        self.stage_state = payload.get("stage_state")
        torch.set_rng_state(payload["torch_rng"][self.dist.rank if self.dist else 0])


def _prefix_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """``module``'s state-dict prefix inside ``model`` (e.g. ``"embedding.compressor."``)."""
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError("module is not part of the model")


def _zero_tensors(tree: Any) -> None:
    if isinstance(tree, ShardedTensor):
        for shard in tree.local_shards():
            shard.tensor.zero_()
    elif isinstance(tree, torch.Tensor):
        tree.zero_()
    elif isinstance(tree, dict):
        for v in tree.values():
            _zero_tensors(v)


def load_weights(path: Path, what: str) -> Any:
    """``torch.load`` (no pickle) with a one-line error naming the file when it is damaged."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(
            f"{path}: unreadable {what} file ({reason}); it is truncated or corrupt — "
            "delete it to start this run afresh"
        ) from e


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_states(info: DistInfo | None) -> list[torch.Tensor]:
    """Every rank's torch RNG state (dropout draws differ per rank)."""
    state = torch.get_rng_state()
    if info is None:
        return [state]
    states = [torch.empty_like(state) for _ in range(info.world_size)]
    dist.all_gather(states, state)
    return states


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
