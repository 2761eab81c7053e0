"""Checks shared by the pruning family's tests (optembed, pep, deeplight)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ctr.serving.compact import CompactModel
from ctr.serving.export import export
from ctr.training.run import RunConfig, load_run_model, train_run
from ctr.training.trainer import TrainConfig
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta
from datasets.synthetic import SIGNAL_PATTERN
from tests.helpers.table_checks import artifact_embedding_bytes


def config(data: Path, method: str, budget: Any, epochs: float = 0.2, **options: Any) -> RunConfig:
    """A small DeepFM run of ``method`` (batches of 1024, or 256 on tiny data)."""
    tiny = DatasetMeta.load(data).rows("train") < 10_000
    return RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [32]},
        compressor=method,
        budget=budget,
        method_options=options,
        # Named: "auto" would train the pruning family with its paper's Adam.
        train=TrainConfig(
            table_optimizer="rowwise_adagrad",
            table_lr=0.05,
            epochs=epochs,
            batch_size=256 if tiny else 1024,
            progress=False,
            eval_batch_size=8192,
            checkpoint_every=7,
        ),
    )


def signal_of(meta: DatasetMeta) -> dict[str, float]:
    """The synthetic teacher's planted signal strength per sparse field."""
    return {f.name: SIGNAL_PATTERN[i % len(SIGNAL_PATTERN)] for i, f in enumerate(meta.sparse)}


def check_artifact(
    run_dir: Path, data: Path, out: Path, atol: float, storage: str | None = None
) -> dict[str, Any]:
    """Artifact embedding bytes == serve_bytes == manifest; served predictions == trained
    (within ``atol``), the run served at ``storage`` when given (``ctr export --storage``)."""
    model, _ = load_run_model(run_dir)
    if storage is not None:
        model.embedding.compressor.set_storage(storage)
    memory = model.embedding.memory()
    assert model.embedding.export().nbytes == memory.serve_bytes
    manifest = export(model, out, dataset=str(data))
    assert artifact_embedding_bytes(out) == (memory.serve_bytes, memory.serve_bytes)
    assert manifest["embedding"]["serve_bytes"] == memory.serve_bytes
    compact = CompactModel.load(out)
    batch = next(iter(BatchLoader(data, "test", batch_size=4096).epoch(0)))
    model.eval()
    with torch.no_grad():
        trained = model(batch.dense_features, batch.sparse_features)
    served = compact(batch.dense_features, batch.sparse_features)
    assert (trained - served).abs().max().item() <= atol
    return manifest


def check_resume(cfg: RunConfig, tmp: Path, kills: list) -> None:
    """Runs ``cfg`` whole, and again interrupted by each of ``kills`` in turn (an int: stop
    after that many steps in all; a context manager factory: a patch that raises
    ``KeyboardInterrupt`` inside the run) and resumed: the final weights and metrics are
    identical."""
    whole = train_run(cfg, tmp / "whole")
    split = tmp / "split"
    for kill in kills:
        if isinstance(kill, int):
            stopped = RunConfig.from_json(cfg.to_json())
            stopped.train.max_steps = kill
            assert train_run(stopped, split)["finished"] is False
            continue
        with kill():
            try:
                train_run(cfg, split)
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("the patched run was not killed")
    resumed = train_run(cfg, split)
    a = torch.load(tmp / "whole" / "model.pt", weights_only=True)
    b = torch.load(split / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert whole["test_logloss"] == resumed["test_logloss"]


def zeroed_auc(run_dir: Path, data: Path) -> float:
    """Test AUC of the finished run with its embedding table zeroed (learning tests' control)."""
    model, _ = load_run_model(run_dir)
    with torch.no_grad():
        model.embedding.compressor.table.weight.zero_()
    from ctr.training.trainer import Trainer

    meta = DatasetMeta.load(data)
    loader = BatchLoader(meta, "test", 16384)
    return Trainer(model, loader, loader, TrainConfig(progress=False)).evaluate(loader)["auc"]
