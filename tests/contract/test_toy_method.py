"""Adding a method is one file: a toy compressor defined and registered here is solved,
trained, exported and served through the public API with no edit anywhere else.

``toy_modulo`` gives every field a table of ``rows`` rows (the most the budget buys, split
evenly) and reads id ``v`` from row ``v mod rows``. A real method's file would sit in its
family's package (``compressors/hashing/``, ...) and be imported by the family's
``__init__.py``; ``python -m compressors.catalog`` then regenerates ``catalog.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import TableMethod, available, build_compressor, solve
from compressors.core.layout import INDEX_MAPS, IndexMap, field_index, register_index_map
from compressors.core.registry import COMPRESSORS, register
from compressors.core.storage import Lookup, TableSpec, row_bytes
from compressors.core.tables import TableLayout
from ctr import (
    CompactModel,
    RunConfig,
    TrainConfig,
    export,
    features_from_dataset,
    load_run_model,
    train_run,
)
from datasets.loader import BatchLoader

DIM = 8


# ---------------------------------------------------------------- the method (one file)
class ModuloMap(IndexMap):
    """Field ``f``'s id ``v`` -> row ``v mod rows_f`` of the field's own table."""

    kind = "toy_modulo"

    def __init__(self, features: Sequence[str], rows: Sequence[int]) -> None:
        super().__init__(features, features)
        self.rows = [int(r) for r in rows]
        self.register_buffer("_rows", torch.tensor(self.rows), persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        features = self.check_keys(features)
        values = features.values() % self._rows[field_index(features)]
        return KeyedJaggedTensor(
            keys=self.lookup_keys,
            values=values,
            lengths=features.lengths(),
            stride=features.stride(),
        )

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "rows": self.rows}

    @classmethod
    def from_config(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ModuloMap:
        return cls(config["features"], config["rows"])


class ToyModulo(TableMethod):
    """``toy_modulo``: per-field tables of ``rows`` rows, id ``v`` read at ``v mod rows``.

    Options: ``storage`` (TableMethod's). Deviations from the paper: none (there is none).
    """

    name = "toy_modulo"

    def solve_layout(self) -> TableLayout:
        per_field = self.budget_bytes // len(self.features) // row_bytes(self.dim, self.storage)
        rows = [max(1, min(f.cardinality, per_field)) for f in self.features]
        names = self.feature_names
        return TableLayout(
            tables=[
                TableSpec(f"t_{n}", r, self.dim, self.storage)
                for n, r in zip(names, rows, strict=True)
            ],
            lookups=[Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)],
            index_map=ModuloMap(names, rows),
        )


@pytest.fixture
def toy_method():
    """Registers the toy method for one test and removes it after: the conformance suite
    and the catalog check read the registry of the shipped methods."""
    register_index_map(ModuloMap)
    register(ToyModulo)
    try:
        yield ToyModulo.name
    finally:
        COMPRESSORS.pop(ToyModulo.name, None)
        INDEX_MAPS.pop(ModuloMap.kind, None)


# ---------------------------------------------------------------- end to end
def _logits(model, data):
    batch = next(iter(BatchLoader(data, "test", batch_size=300)))
    with torch.no_grad():
        return model(batch.dense_features, batch.sparse_features)


def test_a_method_in_one_file_trains_exports_and_serves(toy_method, tiny_data, tmp_path):
    assert toy_method in available()
    features = features_from_dataset(tiny_data)
    plan = solve(toy_method, features, DIM, "4x")
    assert plan.serve_bytes <= plan.budget_bytes
    layer = build_compressor(toy_method, features, dim=DIM, budget="4x")
    assert layer.memory().serve_bytes == plan.serve_bytes

    config = RunConfig(
        data=str(tiny_data),
        model="deepfm",
        model_options={"hidden": [8]},
        dim=DIM,
        compressor=toy_method,
        budget="4x",
        train=TrainConfig(epochs=0.5, batch_size=512, progress=False, eval_every=2, seed=1),
    )
    train_run(config, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["serve_bytes"] <= summary["budget_bytes"]

    model, _ = load_run_model(tmp_path / "run")
    model.eval()
    manifest = export(model, tmp_path / "artifact")
    assert manifest["embedding"]["serve_bytes"] == summary["serve_bytes"]
    served = CompactModel.load(tmp_path / "artifact")
    assert (_logits(served, tiny_data) - _logits(model, tiny_data)).abs().max() < 1e-4

    # The mechanism is what serves: ids of the largest field that agree mod its rows read
    # one row, and the next id another.
    names = served.feature_names
    field = max(features, key=lambda f: f.cardinality)
    rows = layer.index_map.rows[layer.feature_names.index(field.name)]
    assert rows < field.cardinality
    ids = [[0, 0, 0] if n != field.name else [1, 1 + rows, 2] for n in names]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=names,
        values=torch.tensor([v for per in ids for v in per]),
        lengths=torch.ones(3 * len(names), dtype=torch.int32),
    )
    with torch.no_grad():
        out = served.model.embedding(kjt).reshape(3, len(names), -1)[:, names.index(field.name)]
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
