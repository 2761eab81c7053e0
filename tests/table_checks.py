"""Checks shared by the tests of the table-based inter-feature methods: hash, unified, qr, adapt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from compressors import Compressor, FeatureSpec
from ctr.artifact import MANIFEST_FILE, TENSORS_FILE, CompactModel, export
from ctr.run import RunConfig, build_run_model, load_run_model, train_run
from ctr.trainer import TrainConfig, Trainer
from datasets.format import DatasetMeta
from datasets.loader import BatchLoader
from datasets.synthetic import SyntheticConfig

RATIOS = ("2x", "10x", "100x", "1000x")


def criteo_features(scale: float = 0.01, zipf: bool = False) -> list[FeatureSpec]:
    """The synthetic data's Criteo profile at ``scale``; ``zipf`` adds Zipf train counts."""
    sizes = SyntheticConfig(scale=scale).field_sizes()
    specs = []
    for i, n in enumerate(sizes):
        counts = None
        if zipf:
            counts = np.floor(1e6 / np.arange(1, n + 1) ** 1.1)
            counts = np.concatenate([[0.0], counts[: n - 1]])  # id 0: OOV, never seen in train
        specs.append(FeatureSpec(f"C{i + 1}", n, frequencies=counts))
    return specs


def artifact_embedding_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the ``embedding.*`` tensors in the safetensors file, the manifest's figure)."""
    tensors = load_file(str(path / TENSORS_FILE))
    stored = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("embedding.")
    )
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    return stored, manifest["embedding"]["serve_bytes"]


def check_memory_matches_artifact(
    compressor: Compressor, model: torch.nn.Module, out: Path
) -> None:
    """serve_bytes == export().nbytes == the embedding bytes the artifact holds."""
    serve = compressor.memory().serve_bytes
    assert serve == compressor.export().nbytes
    export(model, out)
    stored, manifest = artifact_embedding_bytes(out)
    assert stored == manifest == serve


def quick_train(
    data: Path, run_dir: Path, compressor: str, budget: Any, steps: int = 20, **options: Any
) -> dict[str, Any]:
    """A short run of a small DeepFM (``steps`` steps of 1024); returns its summary."""
    cfg = RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [32]},
        compressor=compressor,
        budget=budget,
        method_options=options,
        train=TrainConfig(batch_size=1024, max_steps=steps, progress=False),
    )
    return train_run(cfg, run_dir)


def learn(
    data: Path, compressor: str, budget: Any, epochs: float = 0.2, **options: Any
) -> dict[str, Any]:
    """Trains a small DeepFM briefly (no run dir); returns test AUC/logloss and bytes.

    Tables train at the default table lr (0.05; a brisk 0.2 made per-field hashing look
    worse than it is); modules at their methods' own rates. Claims between methods under one
    tuned protocol live in bench.py (``table_less_claim``, ``unified_claim``).
    """
    cfg = RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [32]},
        compressor=compressor,
        budget=budget,
        method_options=options,
        train=TrainConfig(epochs=epochs, batch_size=1024, lr=3e-3, table_lr=0.05, progress=False),
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
    memory = model.embedding.memory()
    return {
        **trainer.evaluate(BatchLoader(meta, "test", 16384)),
        "serve_bytes": memory.serve_bytes,
        "budget_bytes": model.embedding.compressor.budget_bytes,
    }


def check_round_trip(data: Path, run_dir: Path, out: Path, atol: float = 0.0) -> None:
    """The finished run reloads, exports, and the artifact predicts the trained logits."""
    model, cfg = load_run_model(run_dir)
    first = "table." + model.embedding.compressor.layout.tables[0].name
    fresh = build_run_model(cfg).embedding.export().tensors[first]
    assert not torch.equal(fresh, model.embedding.export().tensors[first])  # it trained
    check_memory_matches_artifact(model.embedding.compressor, model, out)
    compact = CompactModel.load(out)
    model.eval()
    meta = DatasetMeta.load(data)
    batch = next(iter(BatchLoader(meta, "test", batch_size=2048).epoch(0)))
    with torch.no_grad():
        trained = model(batch.dense_features, batch.sparse_features)
    served = compact(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(served, trained, atol=atol, rtol=0.0)
