"""Adding a model is one file plus its line in ``MODELS``: a toy model, registered by a
fixture (the line), trains, exports and serves through the public API with no other edit."""

from __future__ import annotations

import json

import pytest
import torch

from ctr import MODELS, CompactModel, RunConfig, TrainConfig, export, train_run
from ctr.models.base import CTRModel
from ctr.training.run import load_run_model
from datasets.loader import BatchLoader


class SumOfFields(CTRModel):
    """A toy model (the "one file"): a learned weight per field on the summed embedding."""

    name = "sum_of_fields"

    def __init__(self, embedding, num_dense: int, scale: float = 1.0) -> None:
        super().__init__(embedding, num_dense, scale=scale)
        self.weight = torch.nn.Parameter(torch.zeros(self.num_fields))
        self.dense = torch.nn.Linear(num_dense, 1)
        self.scale = scale

    def logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * (emb.sum(-1) @ self.weight) + self.dense(dense).squeeze(-1)


@pytest.fixture
def toy_model(monkeypatch):
    monkeypatch.setitem(MODELS, SumOfFields.name, SumOfFields)  # the "one line"
    return SumOfFields.name


def test_a_model_in_one_file_trains_exports_and_serves(toy_model, tiny_data, tmp_path):
    config = RunConfig(
        data=str(tiny_data),
        model=toy_model,
        model_options={"scale": 2.0},
        dim=8,
        compressor="hash",
        budget="4x",
        train=TrainConfig(epochs=0.5, batch_size=512, progress=False, eval_every=2, seed=1),
    )
    train_run(config, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == toy_model

    model, _ = load_run_model(tmp_path / "run")
    model.eval()
    assert isinstance(model, SumOfFields) and model.scale == 2.0  # options rebuilt
    assert model.weight.abs().sum() > 0  # it trained
    export(model, tmp_path / "artifact")
    served = CompactModel.load(tmp_path / "artifact")
    assert isinstance(served.model, SumOfFields)
    batch = next(iter(BatchLoader(tiny_data, "test", batch_size=300)))
    with torch.no_grad():
        want = model(batch.dense_features, batch.sparse_features)
        got = served(batch.dense_features, batch.sparse_features)
    assert (got - want).abs().max() < 1e-4
