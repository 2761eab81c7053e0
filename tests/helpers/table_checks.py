"""Checks shared by the tests of the table-based inter-feature methods: hash, unified, qr, adapt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from compressors import Compressor, FeatureSpec
from compressors.core.registry import method_options
from ctr.serving.compact import CompactModel
from ctr.serving.export import export
from ctr.serving.manifest import MANIFEST_FILE, TENSORS_FILE
from ctr.training.run import RunConfig, build_run_model, load_run_model, train_run
from ctr.training.trainer import TrainConfig, Trainer
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta
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


# The brisk learning rates of :func:`learn`: dense Adam, fused tables, and the methods' own
# module learning rates (their ``lr`` option) at their defaults, all times ``lr_scale``.
LEARN_LR, LEARN_TABLE_LR = 3e-3, 0.2
LR_SCALES = (0.3, 1.0)  # each side of an "A beats B" claim picks its best on seed 0


def train_small(
    data: Path,
    compressor: str,
    budget: Any,
    epochs: float = 0.2,
    seed: int = 0,
    lr_scale: float = 1.0,
    zero: str | None = None,
    **options: Any,
) -> tuple[torch.nn.Module, Trainer, DatasetMeta]:
    """Trains a small DeepFM briefly (no run dir). ``zero`` = ``"embedding"`` or ``"module"``
    makes that part output zeros throughout (a mutation: the method learns nothing)."""
    own_lr = method_options(compressor).get("lr")
    if lr_scale != 1.0 and own_lr is not None and "lr" not in options:
        options = {**options, "lr": own_lr * lr_scale}
    cfg = RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [32]},
        compressor=compressor,
        budget=budget,
        method_options=options,
        train=TrainConfig(
            epochs=epochs,
            batch_size=1024,
            lr=LEARN_LR * lr_scale,
            table_lr=LEARN_TABLE_LR * lr_scale,
            seed=seed,
            progress=False,
        ),
    )
    meta = DatasetMeta.load(data)
    model = build_run_model(cfg, meta)
    if zero is not None:
        zero_output(ablated_part(model, zero))
    trainer = Trainer(
        model,
        BatchLoader(meta, "train", 1024, shuffle=True, seed=seed, drop_last=True),
        BatchLoader(meta, "valid", 16384),
        cfg.train,
    )
    trainer.fit()
    return model, trainer, meta


def ablated_part(model: torch.nn.Module, part: str) -> torch.nn.Module:
    """``"embedding"``: the whole embedding layer; ``"module"``: a hybrid method's module."""
    return model.embedding if part == "embedding" else model.embedding.compressor.module


def zero_output(module: torch.nn.Module) -> Any:
    """Makes ``module`` output zeros (a forward hook; returns its handle)."""
    return module.register_forward_hook(lambda _m, _inputs, out: torch.zeros_like(out))


def learn(
    data: Path,
    compressor: str,
    budget: Any,
    epochs: float = 0.2,
    seed: int = 0,
    lr_scale: float = 1.0,
    **options: Any,
) -> dict[str, Any]:
    """Trains a small DeepFM briefly (no run dir); returns test AUC/logloss, valid AUC and
    bytes. Brisk learning rates let a fifth of an epoch separate the methods.
    """
    model, trainer, meta = train_small(data, compressor, budget, epochs, seed, lr_scale, **options)
    memory = model.embedding.memory()
    return {
        **trainer.evaluate(BatchLoader(meta, "test", 16384)),
        "valid_auc": trainer.evaluate(trainer.valid)["auc"],
        "serve_bytes": memory.serve_bytes,
        "budget_bytes": model.embedding.compressor.budget_bytes,
    }


def learning_margin(
    data: Path,
    compressor: str,
    budget: Any,
    part: str = "embedding",
    mutate: bool = False,
    epochs: float = 0.1,
    **options: Any,
) -> tuple[float, float]:
    """(test AUC, test AUC with ``part``'s output zeroed) of a short run; with ``mutate`` the
    part outputs zeros during training too (a broken method), so the two are equal."""
    model, trainer, meta = train_small(
        data, compressor, budget, epochs, zero=part if mutate else None, **options
    )
    test = BatchLoader(meta, "test", 16384)
    learned = trainer.evaluate(test)["auc"]
    handle = zero_output(ablated_part(model, part))
    ablated = trainer.evaluate(test)["auc"]
    handle.remove()
    return learned, ablated


def seed_runs(
    data: Path,
    compressor: str,
    budget: Any,
    seeds: tuple[int, ...] = (0, 1, 2),
    epochs: float = 0.2,
    **options: Any,
) -> dict[str, Any]:
    """Test AUCs over ``seeds`` at the method's own best ``lr_scale`` (of :data:`LR_SCALES`,
    chosen by seed 0's validation AUC)."""
    first = {s: learn(data, compressor, budget, epochs, seeds[0], s, **options) for s in LR_SCALES}
    scale = max(first, key=lambda s: first[s]["valid_auc"])
    runs = [first[scale]] + [
        learn(data, compressor, budget, epochs, seed, scale, **options) for seed in seeds[1:]
    ]
    return {
        "aucs": [r["auc"] for r in runs],
        "lr_scale": scale,
        "serve_bytes": runs[0]["serve_bytes"],
        "budget_bytes": runs[0]["budget_bytes"],
    }


def spread(values: Any) -> float:
    return max(values) - min(values)


def beats(a: Any, b: Any, margin: float = 0.0) -> bool:
    """``a`` beats ``b`` beyond the seed noise, read both ways:

    * paired — ``a[i]`` and ``b[i]`` share the seed of their initial weights and data order:
      every gain ``a[i] - b[i]`` is positive and their mean exceeds their spread;
    * unpaired — the means differ by more than the two sides' standard deviations together
      (``mean ± std`` bars, as the sweep report prints them, do not overlap).

    ``margin`` is added to both thresholds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    gains = a - b
    paired = gains.min() > 0 and gains.mean() > spread(gains) + margin
    unpaired = a.mean() - b.mean() > a.std() + b.std() + margin
    return bool(paired and unpaired)


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
