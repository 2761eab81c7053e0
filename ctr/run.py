"""A training run from a readable config: dataset + model + compressor + budget + optimiser.

``RUN/config.json`` records the config; ``RUN/summary.json`` the results other tools read
(``test_auc``, ``test_logloss``, ``valid_auc``, ``serve_bytes``, ``train_bytes``,
``full_bytes``, ``budget_bytes``, ``compressor``, ``model``, ``samples_per_sec``, ...);
``RUN/plan.json`` the compressor's plan as solved when the run started (layout and exact
bytes): loading the run checks that this version builds the same, and ``ctr export
--storage`` serves that same layout at another dtype.

Example::

    cfg = RunConfig(data="data/synth", model="deepfm", compressor="full", budget="1x")
    summary = train_run(cfg, "runs/deepfm-full")
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressors.core.base import Plan
from compressors.core.budget import parse_budget
from ctr.distributed import DistInfo
from ctr.embedding import EmbeddingLayer, features_from_dataset
from ctr.models import CTRModel, build_model
from ctr.trainer import ARCHITECTURE_KEY, TrainConfig, Trainer, seed_everything
from datasets.format import DatasetMeta, atomic_write_text
from datasets.loader import BatchLoader


class RunError(RuntimeError):
    """A run directory that cannot be used as asked."""


@dataclass
class RunConfig:
    """Everything that defines a run; saved as ``config.json``."""

    data: str
    model: str = "deepfm"
    model_options: dict[str, Any] = field(default_factory=dict)
    dim: int = 16
    compressor: str = "full"
    budget: str | int | float = "1x"
    method_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

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
        return cls.from_json(json.loads(path.read_text()))


def build_run_model(cfg: RunConfig, meta: DatasetMeta | None = None) -> CTRModel:
    """The run's model, freshly initialised from its seed (deterministic)."""
    meta = meta or DatasetMeta.load(cfg.data)
    seed_everything(cfg.train.seed)
    layer = EmbeddingLayer(
        features_from_dataset(meta), cfg.dim, cfg.compressor, cfg.budget, **cfg.method_options
    )
    # train_bytes counts the table optimizer's state, as the trainer will set it.
    layer.compressor.table_optimizer = cfg.train.table_optimizer
    return build_model(cfg.model, layer, len(meta.dense), **cfg.model_options)


PLAN_FILE = "plan.json"


def check_run_plan(model: CTRModel, run_dir: str | Path) -> None:
    """Raises RunError when ``model`` (freshly built) is not what the run's plan recorded."""
    path = Path(run_dir) / PLAN_FILE
    if not path.exists():
        return  # runs from before plans were recorded
    try:
        model.embedding.compressor.check_plan(Plan.from_json(json.loads(path.read_text())))
    except ValueError as e:
        raise RunError(f"{path}: {e}") from e


def load_run_model(run_dir: str | Path) -> tuple[CTRModel, RunConfig]:
    """Rebuilds a finished run's model with its final weights (``model.pt``)."""
    cfg = RunConfig.load(run_dir)
    weights = Path(run_dir) / "model.pt"
    if not weights.exists():
        raise RunError(
            f"{run_dir}: the run has not finished (no model.pt); resume it with ctr train"
        )
    model = build_run_model(cfg)
    check_run_plan(model, run_dir)
    state = torch.load(weights, weights_only=True)
    architecture = state.pop(ARCHITECTURE_KEY, None)
    if architecture is not None:
        # A stage changed the method's shapes: rebuild them before reading the weights.
        model.embedding.compressor.rebuild(json.loads(architecture))
    model.load_state_dict(state)
    return model, cfg


def train_run(
    cfg: RunConfig, run_dir: str | Path, dist_info: DistInfo | None = None
) -> dict[str, Any]:
    """Trains (or resumes) the run in ``run_dir`` and writes ``summary.json``."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    meta = DatasetMeta.load(cfg.data)
    _claim_run_dir(cfg, run_dir, main=dist_info is None or dist_info.is_main)
    model = build_run_model(cfg, meta)
    if (run_dir / PLAN_FILE).exists():
        check_run_plan(model, run_dir)  # resuming: the same layout, or a clear error
    elif dist_info is None or dist_info.is_main:
        plan = model.embedding.compressor.plan()
        atomic_write_text(run_dir / PLAN_FILE, json.dumps(plan.to_json(), indent=2))
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    tc = cfg.train

    def loader(split: str, train: bool) -> BatchLoader:
        # Training drops a short last batch: DMP needs equal local batches, and one process
        # must take the same steps as many.
        drop_last = train and meta.rows(split) >= tc.batch_size
        return BatchLoader(
            meta,
            split,
            tc.batch_size if train else tc.eval_batch_size,
            shuffle=train,
            seed=tc.seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world,
            prefetch=2,  # assemble the next batches while the model computes
        )

    trainer = Trainer(model, loader("train", True), loader("valid", False), tc, run_dir, dist_info)
    record = trainer.fit()
    if not record["finished"]:
        return {"finished": False, "steps": record["steps"]}
    valid = trainer.evaluate(trainer.valid)
    test = trainer.evaluate(loader("test", False))
    memory = model.embedding.memory()
    summary = {
        "model": cfg.model,
        "compressor": cfg.compressor,
        "budget": cfg.budget,
        "dim": cfg.dim,
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "valid_auc": valid["auc"],
        "valid_logloss": valid["logloss"],
        "serve_bytes": memory.serve_bytes,
        "train_bytes": memory.train_bytes,
        "full_bytes": memory.full_bytes,
        "budget_bytes": parse_budget(cfg.budget, memory.full_bytes),
        "ratio": memory.ratio,
        "memory_parts": memory.parts,
        "hyperparameters": model.embedding.compressor.hyperparameters(),
        "samples_per_sec": record["samples_per_sec"],
        "steps": record["steps"],
        "world_size": world,
        "teacher_test_auc": meta.extra.get("teacher", {}).get("test_auc"),
        "wall_seconds": time.perf_counter() - start,
        "finished": True,
    }
    if dist_info is None or dist_info.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _claim_run_dir(cfg: RunConfig, run_dir: Path, main: bool) -> None:
    """Writes config.json, or checks that an existing run dir holds this same run."""
    path = run_dir / "config.json"
    if path.exists():
        existing = json.loads(path.read_text())
        mine = json.loads(json.dumps(cfg.to_json()))
        if {k: v for k, v in existing.items() if k != "train"} != {
            k: v for k, v in mine.items() if k != "train"
        } or _resume_relevant(existing["train"]) != _resume_relevant(mine["train"]):
            raise RunError(
                f"{run_dir} holds a different run (config.json differs); "
                "choose another --out or delete it"
            )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cfg.to_json(), indent=2))


def _resume_relevant(train: dict[str, Any]) -> dict[str, Any]:
    # Stopping points and display settings may change between a run and its resumption.
    return {k: v for k, v in train.items() if k not in ("max_steps", "progress")}
