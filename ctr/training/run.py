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
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from compressors.core.base import Plan, plan_context
from compressors.core.decay import EmbeddingRows
from ctr.embedding import EmbeddingLayer, features_from_dataset
from ctr.models import CTRModel, build_model
from ctr.training import resources
from ctr.training.checkpoint import ARCHITECTURE_KEY, load_weights, seed_everything
from ctr.training.config import RunConfig, RunError, read_config
from ctr.training.distributed import DistInfo
from ctr.training.placement import Placement, placement_for
from ctr.training.summary import RunSummary
from ctr.training.trainer import Trainer
from datasets.io import atomic_write_text, check_output_dir, refuse_current_dir, replace_dir
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta

MIN_STEPS_PER_EPOCH = 200


def auto_batch_size(train_rows: int, low: int = 256, high: int = 4096) -> int:
    """The largest power of two giving at least 200 steps per epoch, clamped to [256, 4096].

    Too few steps per epoch is the common way a default run learns nothing (60k rows at 4096
    are 12 steps); too small a batch wastes the fused kernels.
    """
    target = max(1, train_rows // MIN_STEPS_PER_EPOCH)
    return int(min(high, max(low, 1 << (target.bit_length() - 1))))


def build_run_model(cfg: RunConfig, meta: DatasetMeta | None = None) -> CTRModel:
    """The run's model, freshly initialised from its seed (deterministic).

    Without ``meta``, reads ``cfg.data`` and refuses it if its vocabulary is not the one the
    run recorded (its ids would mean other values)."""
    if meta is None:
        meta = DatasetMeta.load(cfg.data)
        meta.check_vocabulary(cfg.vocabulary, "the vocabulary the run was trained with")
    cfg = cfg.resolved()
    seed_everything(cfg.train.seed)
    # The run's optimizers are plan inputs (train_bytes counts their state): the method is
    # built for them once.
    with plan_context(cfg.plan_context()):
        layer = EmbeddingLayer(
            features_from_dataset(meta, cfg.method_options.get("keys") == "fingerprint"),
            cfg.dim,
            cfg.compressor,
            cfg.budget,
            **cfg.method_options,
        )
    for rows in layer.modules():
        if isinstance(rows, EmbeddingRows):  # weights and their optimizer state load next
            rows.use_optimizer(cfg.train.table_optimizer)
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
        if not (Path(run_dir) / "checkpoint.pt").exists():
            raise RunError(
                f"{run_dir}: the run never trained (no model.pt, no checkpoint.pt); "
                "train it with ctr train --out to this directory"
            )
        raise RunError(
            f"{run_dir}: the run has not finished (no model.pt); resume it with ctr train"
        )
    model = build_run_model(cfg)
    check_run_plan(model, run_dir)
    state = load_weights(weights, "model weights")
    architecture = state.pop(ARCHITECTURE_KEY, None)
    if architecture is not None:
        # A stage changed the method's shapes: rebuild them before reading the weights.
        model.embedding.compressor.rebuild(json.loads(architecture))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(
            f"{weights}: weights do not fit the model config.json describes "
            f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})"
        ) from e
    return model, cfg


def train_run(
    cfg: RunConfig,
    run_dir: str | Path,
    dist_info: DistInfo | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Trains (or resumes) the run in ``run_dir`` and writes ``summary.json``.

    ``run_dir`` must be absent, empty, or hold this same run (which resumes); a different run
    there is replaced only with ``overwrite`` (moved aside while the new one trains, restored
    if it fails). Nothing is written until the model is built, so a refused run (a budget
    the method cannot meet, a bad option) leaves no trace.
    """
    run_dir = Path(run_dir)
    start = time.perf_counter()
    cfg.validate()
    cfg = cfg.resolved()  # config.json records the optimiser and lr the run trains with
    placement = placement_for(dist_info)
    meta = DatasetMeta.load(cfg.data)
    meta.check_shards()  # a missing test shard must not wait until after training
    meta.verify_vocabulary()
    # The resolved path, so export works from any directory; the vocabulary, so export,
    # resume and predict can tell re-prepared data from the data the weights learned.
    cfg = replace(cfg, data=str(Path(cfg.data).resolve()), vocabulary=meta.vocabulary())
    mode = _check_run_dir(cfg, run_dir, meta, overwrite)
    # Every rank reads the directory before the main one writes into it (a rank that found
    # the main one's half-written files would refuse alone and leave the others waiting).
    placement.barrier()
    if placement.world_size == 1:
        check_memory(cfg, meta)  # before the model allocates anything
        resources.warn_if_oversubscribed()
    main = placement.is_main
    model = build_run_model(cfg, meta)
    if mode == "resume" and (run_dir / PLAN_FILE).exists():
        check_run_plan(model, run_dir)  # resuming: the same layout, or a clear error
    if mode != "replace":
        return _train(cfg, run_dir, meta, model, placement, start, fresh=mode == "new")
    staging = replace_dir(run_dir, "run", is_run_dir, True, in_place=True) if main else None
    with staging or nullcontext():
        placement.barrier()  # every rank starts after the previous run is out of the way
        return _train(cfg, run_dir, meta, model, placement, start, fresh=True)


def check_memory(cfg: RunConfig, meta: DatasetMeta) -> int:
    """Refuses a run whose parameters and batches cannot fit the memory this process can
    still allocate (a run at ``--dim 100000`` would otherwise grow until the kernel kills
    it, minutes later and without a word); returns the estimate in bytes.

    The estimate is a floor, not a forecast: the method's exact training bytes (its plan),
    the dense parameters with their gradients and Adam's two moments, and one batch's
    embedding output (for the larger of the train and evaluation batch) twice over.
    """
    from compressors import solve
    from compressors.core.budget import describe_bytes

    features = features_from_dataset(meta, cfg.method_options.get("keys") == "fingerprint")
    context = cfg.resolved().plan_context()
    plan = solve(
        cfg.compressor, features, cfg.dim, cfg.budget, context=context, **cfg.method_options
    )
    dense = 16 * _dense_parameters(cfg, meta)
    rows = max(cfg.train.batch_size, cfg.train.eval_batch_size)
    batch = 2 * 4 * rows * len(meta.sparse) * cfg.dim
    need = plan.train_bytes + dense + batch
    have = resources.available_memory_bytes()
    if need > have:
        raise RunError(
            f"the run needs at least {describe_bytes(need)} (embedding "
            f"{describe_bytes(plan.train_bytes)}, dense parameters with Adam "
            f"{describe_bytes(dense)}, a batch of {rows:,} rows {describe_bytes(batch)}) but "
            f"{describe_bytes(have)} is available; lower --dim, --budget or --batch-size"
        )
    return need


def _dense_parameters(cfg: RunConfig, meta: DatasetMeta) -> int:
    """The model's parameters outside the embedding, counted on the meta device (nothing
    allocated); 0 when the model cannot be built (building it for real says why)."""
    import torch
    from torch import nn

    from ctr.embedding import ServingEmbedding
    from ctr.models import MODELS

    stub = ServingEmbedding(nn.Identity(), len(meta.sparse), cfg.dim, cfg.compressor)
    try:
        with torch.device("meta"):
            model = MODELS[cfg.model](stub, len(meta.dense), **cfg.model_options)
    except Exception:  # noqa: BLE001 - the real build reports it with its own message
        return 0
    return sum(p.numel() for k, p in model.named_parameters() if not k.startswith("embedding."))


def _train(
    cfg: RunConfig,
    run_dir: Path,
    meta: DatasetMeta,
    model: CTRModel,
    placement: Placement,
    start: float,
    fresh: bool,
) -> dict[str, Any]:
    if placement.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_json(), indent=2))
        if fresh or not (run_dir / PLAN_FILE).exists():
            plan = model.embedding.compressor.plan()
            atomic_write_text(run_dir / PLAN_FILE, json.dumps(plan.to_json(), indent=2))
    rank, world = placement.rank, placement.world_size
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

    train_loader = loader("train", True)
    if placement.is_main:
        _warn_if_few_steps(len(train_loader), meta.rows("train"), tc.batch_size)
    trainer = Trainer(model, train_loader, loader("valid", False), tc, run_dir, placement=placement)
    record = trainer.fit()
    if not record["finished"]:
        return {"finished": False, "steps": record["steps"]}
    valid = trainer.evaluate(trainer.valid)
    test = trainer.evaluate(loader("test", False))
    memory = model.embedding.memory()
    # Lazy embedding L2's per-row state is training memory too (the method's report cannot
    # know the run's L2 setting).
    decay_bytes = trainer.decay_state_bytes()
    compressor = model.embedding.compressor
    summary = RunSummary(
        model=cfg.model,
        compressor=cfg.compressor,
        budget=cfg.budget,
        dim=cfg.dim,
        test_auc=test["auc"],
        test_logloss=test["logloss"],
        valid_auc=valid["auc"],
        valid_logloss=valid["logloss"],
        serve_bytes=memory.serve_bytes,
        train_bytes=memory.train_bytes + decay_bytes,
        train_parts={"embedding": memory.train_bytes, "lazy_l2_state": decay_bytes},
        full_bytes=memory.full_bytes,
        budget_bytes=compressor.budget_bytes,  # as the method parsed it
        ratio=memory.ratio,
        memory_parts=memory.parts,
        hyperparameters=compressor.hyperparameters(),
        samples_per_sec=record["samples_per_sec"],
        steps=record["steps"],
        train_seconds=trainer.state.train_seconds,
        stage_seconds=record["stage_seconds"],
        batch_size=tc.batch_size,
        world_size=world,
        teacher_test_auc=meta.extra.get("teacher", {}).get("test_auc"),
        wall_seconds=time.perf_counter() - start,
    ).to_json()
    if placement.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


FEW_STEPS = 50  # fewer optimizer steps per epoch than this rarely learn anything useful


def _warn_if_few_steps(steps: int, rows: int, batch_size: int) -> None:
    if steps >= FEW_STEPS:
        return
    suggestion = 1 << max(0, (rows // (4 * FEW_STEPS)).bit_length() - 1)
    print(
        f"warning: an epoch of {rows:,} train rows is only {steps} steps at --batch-size "
        f"{batch_size}; small data learns little in few steps — try --batch-size {suggestion} "
        "or more --epochs",
        file=sys.stderr,
    )


RUN_FILES = {
    "config.json",
    PLAN_FILE,
    "summary.json",
    "model.pt",
    "best.pt",
    "initial.pt",
    "checkpoint.pt",
    "metrics.jsonl",
}


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run (a readable config.json) and only a run's files, so
    replacing it loses nothing the user put there."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    names = RUN_FILES | {f"{name}.tmp" for name in RUN_FILES}
    return (
        isinstance(raw, dict)
        and "data" in raw
        and all(
            (p.name in names or _is_temporary(p.name)) and p.is_file() and not p.is_symlink()
            for p in path.iterdir()
        )
    )


def _is_temporary(name: str) -> bool:
    """A temporary :func:`datasets.io.atomic_write` leaves when killed mid-write."""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


def _check_run_dir(cfg: RunConfig, run_dir: Path, meta: DatasetMeta, overwrite: bool) -> str:
    """What ``run_dir`` allows, without writing: "new" (absent or empty), "resume" (this same
    run) or "replace" (a different run, with ``overwrite``); anything else is refused."""
    refuse_current_dir(run_dir)
    path = run_dir / "config.json"
    if path.is_file():
        existing = read_config(path)
        mine = json.loads(json.dumps(cfg.to_json()))
        # Runs recorded before paths were resolved hold the path as given.
        existing["data"] = str(Path(existing.get("data", "")).resolve())
        differs = [
            k
            for k in sorted(set(existing) | set(mine))
            if k not in ("train", "vocabulary") and existing.get(k) != mine.get(k)
        ]
        if not differs and _resume_relevant(existing.get("train", {})) != _resume_relevant(
            mine["train"]
        ):
            differs = ["train"]
        if not differs:
            meta.check_vocabulary(existing.get("vocabulary"), f"the run in {run_dir} (resuming)")
            return "resume"
        if is_run_dir(run_dir) and not overwrite:
            raise RunError(
                f"{run_dir} holds a different run (config.json differs in {differs}); "
                "pass --overwrite to replace it, or choose another --out"
            )
    check_output_dir(run_dir, "run", is_run_dir, overwrite)
    return "replace" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"


def _resume_relevant(train: dict[str, Any]) -> dict[str, Any]:
    # Stopping points, display settings and the device may change between a run and its
    # resumption.
    return {k: v for k, v in train.items() if k not in ("max_steps", "progress", "device")}
