"""One trainer for every method: stages, fused tables, early stopping, exact resume.

Physical tables train inside fbgemm (a fused optimizer in the backward pass: the method's
table optimizer, rowwise Adagrad unless it declares another; on CPU fbgemm offers SGD,
Adagrad and rowwise Adagrad, not Adam); a method's own parameter groups use the optimizer it
declares, all other parameters Adam (:mod:`ctr.training.optimizers`). Embedding parameters
(tables and groups flagged ``embedding``) can get decoupled L2 (``embedding_l2``; lazy per
row on fused tables) and plateau lr decay; ``module_optimizer="table"`` trains embedding
groups with the tables' optimizer family and lr (the fair-comparison protocol). Where the
model lives — one process, or TorchRec DMP shards under ``torchrun`` — is a
:class:`~ctr.training.placement.Placement`; the run's files are
:class:`~ctr.training.checkpoint.RunFiles`.

The trainer implements the compressors' :class:`~compressors.core.base.StageContext` (as
:class:`~ctr.training.context.RunContext`) and honours each
:class:`~compressors.core.base.Stage`'s flags: gradient stages or the method's own
procedure, bilevel alternation of training and validation batches, a frozen dense network,
rewinds to the initial weights, and rebuilds.

Example::

    trainer = Trainer(model, train_loader, valid_loader, TrainConfig(epochs=2), run_dir="runs/a")
    summary = trainer.fit()          # resumes from runs/a/checkpoint.pt when present
    trainer.evaluate(test_loader)    # {"auc": ..., "logloss": ...}
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compressors.core.base import Compressor, Stage
from ctr.models.base import CTRModel
from ctr.training.checkpoint import (
    ARCHITECTURE_KEY,
    Checkpointed,
    RunFiles,
    TrainState,
    load_weights,
    seed_everything,
)
from ctr.training.config import DEFAULT_TABLE_LRS, TrainConfig
from ctr.training.context import LossCheck, RunContext, TrainingDiverged
from ctr.training.distributed import DistInfo
from ctr.training.metrics import auc_logloss
from ctr.training.optimizers import OPTIMIZERS, build_optimizers
from ctr.training.placement import Placement, embedding_rows, placement_for, table_modules
from datasets.loader import PAD_LABEL, BatchLoader
from datasets.progress import progress_bar

log = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURE_KEY",
    "DEFAULT_TABLE_LRS",
    "OPTIMIZERS",
    "LossCheck",
    "RunContext",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "embedding_rows",
    "load_weights",
    "seed_everything",
    "table_modules",
]


def resolve_for(config: TrainConfig, compressor: Compressor) -> TrainConfig:
    """``config`` with its table optimiser as the model was planned for (``"auto"``: the
    compressor's; see :class:`~compressors.core.base.PlanContext`) and ``table_lr`` None
    resolved; refuses a model planned for another table optimiser."""
    optimizer = config.table_optimizer
    if optimizer == "auto":
        optimizer = compressor.table_optimizer
    elif optimizer != compressor.table_optimizer:
        raise ValueError(
            f"{compressor.name}: the model was built for table optimizer "
            f"{compressor.table_optimizer!r} (its plan's train bytes and row tables count on "
            f"it), the trainer was given {optimizer!r}; build it with "
            f"PlanContext(table_optimizer={optimizer!r}) (ctr.training.run.build_run_model "
            "does) or leave the trainer's table_optimizer at 'auto'"
        )
    lr = config.table_lr if config.table_lr is not None else DEFAULT_TABLE_LRS[optimizer]
    return replace(config, table_optimizer=optimizer, table_lr=lr)


class Trainer(Checkpointed):
    """Runs a model's compressor stages in order (see module docstring)."""

    def __init__(
        self,
        model: CTRModel,
        train: BatchLoader,
        valid: BatchLoader,
        config: TrainConfig | None = None,
        run_dir: str | os.PathLike | None = None,
        dist_info: DistInfo | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.model = model
        self.train = train
        self.valid = valid
        self.compressor: Compressor = model.embedding.compressor
        self.config = resolve_for(config or TrainConfig(), self.compressor)
        self.run_dir = Path(run_dir) if run_dir else None
        self.dist = dist_info
        self.placement = placement or placement_for(dist_info)
        self.state = TrainState()
        self.stage_state: dict[str, Any] | None = None
        self._spill: Path | None = None  # best and initial weights without a run directory
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
        self.placement.check(self.compressor, self.config)
        self.net: torch.nn.Module = self.placement.wrap(model, self.config)
        if self.placement.device.type == "cuda":  # page-locked batches: asynchronous copies
            self.train, self.valid, self.search = (
                loader.pinned() for loader in (self.train, self.valid, self.search)
            )
        self._setup_optimizers()
        self.files = RunFiles(self.run_dir, self.main)

    @property
    def main(self) -> bool:
        return self.placement.is_main

    # ---------------------------------------------------------------- optimisers
    def _setup_optimizers(self) -> None:
        """Fuses the tables (single process) and builds every optimizer afresh."""
        dense, self.table_optimizers = self.placement.setup_tables(
            self.model, self.net, self.config
        )
        # Gradients the placement averages over ranks itself (none in one process).
        self.replicated = self.placement.replicated_parameters(self.model, self.net)
        built = build_optimizers(self.compressor, dense, self.config)
        self.optimizers, self.valid_optimizers = built.train, built.valid
        self.embedding_groups = built.embedding
        self._apply_lr_scale()

    def _all_optimizers(self) -> dict[str, Any]:
        return {**self.optimizers, **self.valid_optimizers, **self.table_optimizers}

    def _apply_lr_scale(self) -> None:
        """Embedding learning rates = their base rates x ``state.lr_scale`` (plateau decay)."""
        self.placement.set_table_lr(self.table_optimizers, self.embedding_lr)
        for name in self.embedding_groups:
            for g in self.optimizers[name].param_groups:
                g["lr"] = g["base_lr"] * self.state.lr_scale

    @property
    def embedding_lr(self) -> float:
        """The embedding learning rate now: the table lr times the plateau decay."""
        return self.config.table_lr * self.state.lr_scale  # type: ignore[operator]

    def decay_state_bytes(self) -> int:
        """Bytes lazy embedding L2 keeps beside the tables (0 without it)."""
        return sum(m.decay.state_bytes() for m in embedding_rows(self.model) if m.decay is not None)

    def _decay_embeddings(self) -> None:
        """Decoupled embedding L2 after a step: tables (lazy/dense) and embedding modules."""
        cfg = self.config
        if not cfg.embedding_l2:  # (a sharded run refuses embedding_l2)
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
                self._forget_best()
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
            # Every rank holds rank 0's state (identical already, unless a bug let them
            # drift), so the decisions each rank takes from it next (masks, dims) agree.
            self.placement.sync(self.model)
            self.compressor.on_stage_end(stage, ctx)
            if stage.rebuilds:
                self.state.architecture = self.compressor.architecture()
                self._rebuilt()
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

    def _rebuilt(self) -> None:
        """The method rebuilt its tables: shard the new ones, optimizers afresh."""
        self.net = self.placement.rewrap(self.model, self.net, self.config)
        self._setup_optimizers()

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
                    st.samples += len(batch.labels) * self.placement.world_size
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
        batch = self.placement.to_device(batch)
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
        self.placement.average_gradients(self.replicated)
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
        self.placement.average_gradients(params)
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
        self.files.append_metrics(record)
        return st.bad_evals >= self.config.patience

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, loader: BatchLoader, max_batches: int | None = None) -> dict[str, float]:
        """AUC and logloss over ``loader`` (all ranks' predictions pooled under DMP)."""
        self.net.eval()
        probs, labels = [], []
        for i, batch in enumerate(loader.epoch(0)):
            if max_batches is not None and i >= max_batches:
                break
            batch = self.placement.to_device(batch)
            probs.append(torch.sigmoid(self.net(batch.dense_features, batch.sparse_features)))
            labels.append(batch.labels)
        p = self.placement.gather(torch.cat(probs)).cpu()
        y = self.placement.gather(torch.cat(labels)).cpu()
        keep = y != PAD_LABEL
        return auc_logloss(y[keep].numpy(), p[keep].numpy())

    def predict(self, loader: BatchLoader) -> np.ndarray:
        self.net.eval()
        with torch.no_grad():
            probs = []
            for b in loader.epoch(0):
                b = self.placement.to_device(b)
                probs.append(torch.sigmoid(self.net(b.dense_features, b.sparse_features)).cpu())
            return torch.cat(probs).numpy()
