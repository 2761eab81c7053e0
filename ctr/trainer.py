"""One trainer for every method: stages, fused tables, early stopping, exact resume.

Physical tables train inside fbgemm (a fused optimizer in the backward pass: rowwise Adagrad
by default; on CPU fbgemm offers SGD, Adagrad and rowwise Adagrad, not Adam); all other
parameters use Adam. Single-process runs swap each EBC for a ``FusedEmbeddingBagCollection``;
under ``torchrun`` the model is wrapped in TorchRec's DMP instead (``ctr.distributed``).

The run directory receives ``config.json`` (written by the caller), ``metrics.jsonl`` (one
line per evaluation), ``checkpoint.pt`` (atomic; everything needed to continue exactly),
``best.pt`` (best validation weights) and ``model.pt`` (final weights, what ``ctr export``
reads). All ``.pt`` files load with ``torch.load(weights_only=True)`` and hold whole
(unsharded) tensors, so a DMP run's files read like a single process's.

Example::

    trainer = Trainer(model, train_loader, valid_loader, TrainConfig(epochs=2), run_dir="runs/a")
    summary = trainer.fit()          # resumes from runs/a/checkpoint.pt when present
    trainer.evaluate(test_loader)    # {"auc": ..., "logloss": ...}
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from compressors.base import Compressor, Stage
from compressors.storage import TrainTables
from ctr.distributed import (
    DistInfo,
    ShardedTableOptimizer,
    dense_parameters,
    full_state_dict,
    load_full_state_dict,
    shard_model,
)
from ctr.metrics import auc_logloss
from ctr.models.base import CTRModel
from datasets.loader import PAD_LABEL, BatchLoader


@dataclass
class TrainConfig:
    """Optimisation settings. ``epochs`` may be fractional; ``eval_every=0`` evaluates once
    per epoch; ``max_steps`` stops (and checkpoints) after that many steps in total."""

    epochs: float = 1.0
    batch_size: int = 4096
    lr: float = 1e-3
    table_lr: float = 0.05
    table_optimizer: str = "rowwise_adagrad"
    weight_decay: float = 0.0
    eval_every: int = 0
    patience: int = 2
    restore_best: bool = True
    checkpoint_every: int = 500
    seed: int = 0
    max_steps: int | None = None
    eval_batch_size: int = 16384
    progress: bool = True


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
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StageContext:
    """What a compressor's hooks see of the training run."""

    trainer: Trainer
    stage: Stage
    batch: Any = None  # the batch of the step just taken (ALPT's after_step re-runs it)

    @property
    def model(self) -> CTRModel:
        return self.trainer.model

    @property
    def step(self) -> int:
        return self.trainer.state.step

    def evaluate(self, split: str = "valid", max_batches: int | None = None) -> dict[str, float]:
        loader = self.trainer.valid if split == "valid" else self.trainer.train
        return self.trainer.evaluate(loader, max_batches=max_batches)

    def valid_batches(self) -> Iterator:
        """Endless validation batches (DNIS-style alternating updates)."""
        epoch = 0
        while True:
            yield from self.trainer.valid.epoch(epoch)
            epoch += 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def table_modules(model: torch.nn.Module) -> list[TrainTables]:
    return [m for m in model.modules() if isinstance(m, TrainTables)]


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
        self._best: dict[str, torch.Tensor] | None = None
        self.compressor: Compressor = model.embedding.compressor
        self.compressor.table_optimizer = self.config.table_optimizer
        cfg = self.config
        if dist_info is None:
            for tables in table_modules(model):
                tables.fuse(cfg.table_optimizer, cfg.table_lr)
            self.net: torch.nn.Module = model
            fused = {id(p) for t in table_modules(model) for p in t.parameters()}
            dense = [p for p in model.parameters() if p.requires_grad and id(p) not in fused]
        else:
            self.net = shard_model(model, dist_info, cfg.table_optimizer, cfg.table_lr)
            dense = dense_parameters(self.net)
        self.optimizers = self._build_optimizers(dense)
        # Fused table optimizers step inside fbgemm's backward; they are only checkpointed.
        self.table_optimizers: dict[str, Any] = (
            {f"tables{i}": t.ebc.fused_optimizer() for i, t in enumerate(table_modules(model))}
            if dist_info is None
            else {"tables": ShardedTableOptimizer(self.net)}
        )
        if self.run_dir and self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def main(self) -> bool:
        return self.dist is None or self.dist.is_main

    # ---------------------------------------------------------------- optimisers
    def _build_optimizers(self, dense: list[torch.nn.Parameter]) -> dict[str, Any]:
        cfg = self.config
        optimizers: dict[str, Any] = {}
        claimed: set[int] = set()
        for i, group in enumerate(self.compressor.optimizer_groups()):
            params = [p for p in group["params"] if p.requires_grad]
            claimed |= {id(p) for p in params}
            kind = group.get("optimizer", "adam")
            lr = group.get("lr", cfg.lr)
            optimizers[f"compressor{i}"] = (
                torch.optim.SGD(params, lr=lr) if kind == "sgd" else torch.optim.Adam(params, lr=lr)
            )
        rest = [p for p in dense if id(p) not in claimed]
        optimizers["dense"] = torch.optim.Adam(rest, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return optimizers

    # ---------------------------------------------------------------- training
    def fit(self) -> dict[str, Any]:
        """Runs (or resumes) every stage; returns the training record."""
        self._resume()
        stages = self.compressor.stages
        while self.state.stage < len(stages) and not self._out_of_steps():
            stage = stages[self.state.stage]
            ctx = StageContext(self, stage)
            if not self.state.stage_started:
                self.state.stage_started = True
                self.state.epoch = self.state.batch = self.state.stage_step = 0
                self.state.best_auc, self.state.bad_evals = -math.inf, 0
            self.compressor.on_stage_start(stage, ctx)
            if stage.trains:
                done = self._train_stage(stage, ctx)
                if not done:
                    break
            else:
                self.compressor.run_stage(stage, ctx)
            self.compressor.on_stage_end(stage, ctx)
            self.state.stage += 1
            self.state.stage_started = False
            self._checkpoint()
        self.state.finished = self.state.stage >= len(stages)
        if self.state.finished:
            self._save_model("model.pt")
        return {
            "finished": self.state.finished,
            "steps": self.state.step,
            "samples_per_sec": self.state.samples / max(self.state.train_seconds, 1e-9),
            "history": self.state.history,
        }

    def _stage_steps(self, stage: Stage) -> int:
        epochs = stage.epochs if stage.epochs is not None else self.config.epochs
        return max(1, math.ceil(epochs * len(self.train)))

    def _out_of_steps(self) -> bool:
        return self.config.max_steps is not None and self.state.step >= self.config.max_steps

    def _train_stage(self, stage: Stage, ctx: StageContext) -> bool:
        """Trains until the stage's steps run out or early stopping; False if interrupted."""
        cfg, st = self.config, self.state
        total = self._stage_steps(stage)
        per_epoch = len(self.train)
        eval_every = cfg.eval_every or per_epoch
        bar = tqdm(
            total=total,
            initial=st.stage_step,
            desc=stage.name,
            unit="step",
            disable=not (cfg.progress and self.main),
            dynamic_ncols=True,
        )
        stopped = False
        try:
            while st.stage_step < total and not stopped:
                batches = self.train.epoch(self._epoch_seed(st.epoch), start_batch=st.batch)
                tick = time.perf_counter()
                for batch in batches:
                    loss = self.train_step(batch)
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
                            stopped = self._evaluate_and_track(stage)
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
        if cfg.restore_best:
            self._restore_best()
        return True

    def _epoch_seed(self, epoch: int) -> int:
        return epoch + 1000 * self.state.stage

    def train_step(self, batch: Any) -> float:
        """One optimisation step on ``batch``; returns the data loss."""
        self.net.train()
        logits = self.net(batch.dense_features, batch.sparse_features)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        total = loss + self.compressor.penalty()
        for opt in self.optimizers.values():
            opt.zero_grad()
        total.backward()
        for opt in self.optimizers.values():
            opt.step()
        return loss.item()

    def _evaluate_and_track(self, stage: Stage) -> bool:
        """Validation AUC/logloss, best-weights tracking; True when patience ran out."""
        st = self.state
        metrics = self.evaluate(self.valid)
        improved = metrics["auc"] > st.best_auc
        if improved:
            st.best_auc, st.bad_evals = metrics["auc"], 0
            self._save_model("best.pt")
        else:
            st.bad_evals += 1
        record = {
            "stage": stage.name,
            "step": st.step,
            "epoch": st.epoch,
            "valid_auc": metrics["auc"],
            "valid_logloss": metrics["logloss"],
        }
        st.history.append(record)
        if self.run_dir and self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
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
            # Extra state (get_extra_state) may hold plain values beside the tensors.
            return {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for k, v in self.model.state_dict().items()
            }
        return full_state_dict(self.net)

    def _save_model(self, name: str) -> None:
        state = self.full_state()
        if self.run_dir and self.main:
            _atomic_save(state, self.run_dir / name)
        if name == "best.pt":
            self._best = state

    def _restore_best(self) -> None:
        best = self._best
        if best is None and self.run_dir and (self.run_dir / "best.pt").exists():
            best = torch.load(self.run_dir / "best.pt", weights_only=True)
        if best is None:
            return
        if self.dist is None:
            self.model.load_state_dict(best)
        else:
            load_full_state_dict(self.net, best)

    def _checkpoint(self) -> None:
        """Everything needed to continue exactly; under DMP gathered whole (collective)."""
        if not self.run_dir:
            return
        optimizers = {**self.optimizers, **self.table_optimizers}
        payload = {
            "model": self.full_state(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "state": asdict(self.state),
            "torch_rng": _rng_states(self.dist),
            "world_size": self.dist.world_size if self.dist else 1,
        }
        if self.main:
            _atomic_save(payload, self.run_dir / "checkpoint.pt")

    def _resume(self) -> None:
        path = self.run_dir / "checkpoint.pt" if self.run_dir else None
        if path is None or not path.exists():
            seed_everything(self.config.seed)
            return
        payload = torch.load(path, weights_only=True)
        world = self.dist.world_size if self.dist else 1
        if payload["world_size"] != world:
            raise RuntimeError(
                f"{path} was written by {payload['world_size']} process(es); resume it with "
                f"the same number (now {world})"
            )
        if self.dist is None:
            self.model.load_state_dict(payload["model"])
        else:
            load_full_state_dict(self.net, payload["model"])
        for k, opt in {**self.optimizers, **self.table_optimizers}.items():
            opt.load_state_dict(payload["optimizers"][k])
        self.state = TrainState(**payload["state"])
        torch.set_rng_state(payload["torch_rng"][self.dist.rank if self.dist else 0])


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
