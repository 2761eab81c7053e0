"""Checks shared by the dimension-search tests (dnis, mde, autodim)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchrec import KeyedJaggedTensor

from compressors import Compressor, FeatureSpec, Plan
from ctr.serving.compact import CompactModel
from ctr.training.run import RunConfig, build_run_model, load_run_model, train_run
from ctr.training.trainer import TrainConfig, Trainer
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta
from tests.helpers.table_checks import check_memory_matches_artifact


def config(
    data: Path,
    method: str,
    budget: Any,
    batch_size: int = 512,
    max_steps: int | None = None,
    dim: int = 8,
    **options: Any,
) -> RunConfig:
    return RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [16]},
        dim=dim,
        compressor=method,
        budget=budget,
        method_options=options,
        train=TrainConfig(
            epochs=1, batch_size=batch_size, max_steps=max_steps, progress=False, eval_every=4
        ),
    )


def check_resume_chain(
    data: Path, tmp: Path, method: str, kills: list[int], budget: Any = "5x", **options: Any
) -> Path:
    """A run killed after each of ``kills`` steps and resumed ends with the uninterrupted
    run's weights and metrics; returns the finished run's directory."""
    train_run(config(data, method, budget, **options), tmp / "whole")
    for steps in kills:
        out = train_run(config(data, method, budget, max_steps=steps, **options), tmp / "split")
        assert out == {"finished": False, "steps": steps}
    train_run(config(data, method, budget, **options), tmp / "split")
    a = torch.load(tmp / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp / "split" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    lines = lambda d: (tmp / d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert lines("whole") == lines("split")
    return tmp / "whole"


def check_export(data: Path, run_dir: Path, out: Path, atol: float = 1e-6) -> None:
    """The finished run reloads; its artifact holds exactly ``serve_bytes`` of embedding
    tensors and predicts what the trained model predicts."""
    model, _ = load_run_model(run_dir)
    check_memory_matches_artifact(model.embedding.compressor, model, out)
    compact = CompactModel.load(out)
    model.eval()
    batch = next(iter(BatchLoader(DatasetMeta.load(data), "test", batch_size=2048).epoch(0)))
    with torch.no_grad():
        trained = model(batch.dense_features, batch.sparse_features)
    served = compact(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(served, trained, atol=atol, rtol=0.0)


def train_model(data: Path, method: str, budget: Any, epochs: float, seed: int = 0, **options: Any):
    """Trains a small DeepFM (no run dir); returns (model, test metrics)."""
    cfg = RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [32]},
        dim=16,
        compressor=method,
        budget=budget,
        method_options=options,
        train=TrainConfig(
            table_optimizer="rowwise_adagrad",  # named: "auto" gives DNIS its paper's Adam
            epochs=epochs,
            batch_size=1024,
            lr=3e-3,
            table_lr=0.2,
            progress=False,
            patience=1,
            seed=seed,
        ),
    )
    meta = DatasetMeta.load(data)
    model = build_run_model(cfg, meta)
    trainer = Trainer(
        model,
        BatchLoader(meta, "train", 1024, shuffle=True, drop_last=True),
        BatchLoader(meta, "valid", 16384),
        cfg.train,
    )
    trainer.fit()
    return model, trainer.evaluate(BatchLoader(meta, "test", 16384))


def random_kjt(features: list[FeatureSpec], batch: int, max_bag: int = 3, seed: int = 0):
    """Random bags of 0..max_bag ids per field and sample (multi-hot everywhere)."""
    g = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for f in features:
        n = torch.randint(0, max_bag + 1, (batch,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, f.cardinality, (int(n.sum()),), generator=g))
    return KeyedJaggedTensor(
        keys=[f.name for f in features], values=torch.cat(values), lengths=torch.cat(lengths)
    )


def check_budget_bound_before_deciding(layer: Compressor, decides: str) -> Plan:
    """Before its deciding stage a searched method plans and reports the budget as a labelled
    bound, and its train_bytes follow the table optimizer the trainer sets (not an option of
    the method). Returns the plan (restores the default optimizer)."""
    plan = layer.plan()
    assert plan.details["bound"] and plan.serve_bytes == layer.budget_bytes
    before = layer.memory()
    assert before.parts == {f"bound: at most the budget ({decides} decides)": layer.budget_bytes}
    assert before.serve_bytes == layer.budget_bytes and before.train_bytes == plan.train_bytes
    layer.table_optimizer = "adagrad"
    assert layer.plan().train_bytes == layer.memory().train_bytes > plan.train_bytes
    layer.table_optimizer = "rowwise_adagrad"
    return plan
