"""The table-less methods (tt, robe, dhe) and their shared hybrid base: the contract tests.

Budgets on the Criteo-profile feature set, exact memory == export == artifact bytes, export
round trip through ``CompactModel``, learning on planted-teacher data; plus the generic
helpers of ``compressors.core.hybrid``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, FeatureSpec, build_compressor, build_serving
from compressors.core.hash64 import salted_hash, stable_salt
from compressors.core.hybrid import (
    FieldRouter,
    collisionless_fields,
    hash_premixed,
    pool_bags,
    premixed_salts,
)
from ctr.serving.compact import CompactModel
from ctr.serving.export import export
from ctr.serving.manifest import MANIFEST_FILE, TENSORS_FILE
from ctr.training.run import RunConfig, load_run_model, train_run
from ctr.training.trainer import TrainConfig
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta
from tests.helpers.features import criteo_features
from tests.helpers.table_checks import learning_margin

METHODS = ("tt", "robe", "dhe")
DIM = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small batches gain nothing from intra-op threads, and on a shared machine
    oversubscribed OpenMP threads make them orders of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_kjt(
    features: list[FeatureSpec], batch: int, seed: int = 0, max_len: int = 1
) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(
        0 if max_len > 1 else 1, max_len + 1, (len(features), batch), generator=g
    )
    values = torch.cat(
        [
            torch.randint(0, f.cardinality, (int(n.sum()),), generator=g)
            for f, n in zip(features, lengths, strict=True)
        ]
    )
    return KeyedJaggedTensor(
        keys=[f.name for f in features], values=values, lengths=lengths.flatten()
    )


# ---------------------------------------------------------------- budgets and memory
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [2, 10, 100, 1000])
def test_budget_met_and_memory_exact_on_criteo_profile(method, ratio):
    features = criteo_features()
    # At 1000x only rank 1 (Kronecker products) fits TT: allowed explicitly.
    options = {"min_rank": 1} if (method, ratio) == ("tt", 1000) else {}
    layer = build_compressor(method, features, DIM, f"{ratio}x", **options)
    memory = layer.memory()
    exported = layer.export()
    assert memory.serve_bytes <= layer.budget_bytes
    assert memory.serve_bytes == exported.nbytes == sum(memory.parts.values())
    assert memory.ratio >= ratio
    assert memory.train_bytes > memory.serve_bytes  # optimizer state on top of the weights
    # Every field is served, by a table or by the module, never both.
    tables = set(layer.hyperparameters()["table_fields"])
    assert tables | set(layer.module.fields) == {f.name for f in features}
    assert not tables & set(layer.module.fields)
    # The largest fields are always compressed; at moderate ratios tiny fields stay tables.
    assert "C3" not in tables
    if ratio <= 100:
        assert {"C9", "C20"} <= tables  # 4 and 5 values


@pytest.mark.parametrize(
    ("method", "budget", "message"),
    [
        ("tt", 300, "tt: even rank 2 needs"),
        ("robe", 40, "robe: 40 B leaves 10 floats for the array"),
        ("dhe", 300, "dhe: 300 B leaves"),
    ],
)
def test_unreachable_budget_is_a_clear_error(method, budget, message):
    with pytest.raises(BudgetError, match=re.escape(message)):
        build_compressor(method, criteo_features(), DIM, budget)


def test_budget_error_before_training_for_fixed_choices():
    with pytest.raises(BudgetError, match="tt: even rank 64 needs"):
        build_compressor("tt", criteo_features(), DIM, "100x", rank=64)
    with pytest.raises(BudgetError, match="smallest network"):
        build_compressor("dhe", criteo_features(), DIM, "1000x", width=64)


@pytest.mark.parametrize("method", METHODS)
def test_construction_is_deterministic(method):
    features = criteo_features()
    torch.manual_seed(1)
    a = build_compressor(method, features, DIM, "100x")
    torch.manual_seed(2)
    b = build_compressor(method, features, DIM, "100x")
    assert a.hyperparameters() == b.hyperparameters()
    assert a.export().config == b.export().config
    assert not torch.equal(next(a.module.parameters()), next(b.module.parameters()))


@pytest.mark.parametrize("method", METHODS)
def test_forward_shape_key_order_and_serving_on_multi_hot(method):
    features = criteo_features()[:6] + [FeatureSpec("M1", 65, multi_hot=True)]
    layer = build_compressor(method, features, DIM, "20x").eval()
    kjt = random_kjt(features, batch=64, max_len=4)
    out = layer(kjt)
    assert out.shape == (64, len(features), DIM)
    empty = kjt["M1"].lengths() == 0
    assert empty.any() and torch.all(out[empty, -1] == 0)  # empty bags pool to zeros
    reordered = kjt.permute(list(reversed(range(len(features)))))
    torch.testing.assert_close(layer(reordered), out, rtol=0, atol=0)
    torch.testing.assert_close(build_serving(layer.export())(kjt), out, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- artifact and round trip
@pytest.mark.parametrize("method", METHODS)
def test_export_round_trip_and_artifact_bytes(method, tiny_data, tmp_path):
    cfg = RunConfig(
        data=str(tiny_data),
        model="deepfm",
        model_options={"hidden": [16]},
        compressor=method,
        budget="4x",
        train=TrainConfig(epochs=1, batch_size=1024, progress=False),
    )
    train_run(cfg, tmp_path / "run")
    model, _ = load_run_model(tmp_path / "run")
    model.eval()
    layer = model.embedding.compressor
    assert layer.tables is not None and layer.module is not None  # both paths exercised

    manifest = export(model, tmp_path / "artifact", dataset=tiny_data)
    with safe_open(str(tmp_path / "artifact" / TENSORS_FILE), framework="pt") as f:
        stored = sum(
            f.get_tensor(k).numel() * f.get_tensor(k).element_size()
            for k in f.keys()
            if k.startswith("embedding.")
        )
    written = json.loads((tmp_path / "artifact" / MANIFEST_FILE).read_text())
    assert stored == manifest["embedding"]["serve_bytes"] == written["embedding"]["serve_bytes"]
    assert stored == layer.memory().serve_bytes == layer.export().nbytes

    compact = CompactModel.load(tmp_path / "artifact")
    batch = next(iter(BatchLoader(DatasetMeta.load(tiny_data), "test", 512).epoch(0)))
    with torch.no_grad():
        expected = model(batch.dense_features, batch.sparse_features)
    got = compact(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- learning
LEARNING_MARGIN = 0.02  # test AUC the module's fields must add over zeroing them


@pytest.mark.parametrize("method", METHODS)
def test_module_fields_carry_learned_signal(method, learn_data):
    # A quarter epoch at 4x. The small fields stay tables and alone reach ~.60-.65 test AUC,
    # so an AUC floor would pass with the module broken (DHE returning zeros: .660 vs .674);
    # the check is what the module's fields add: test AUC minus the same model's AUC with
    # the module's output zeroed (measured margins at 0.1 epoch: robe .046, dhe .043).
    learned, ablated = learning_margin(learn_data, method, "4x", part="module", epochs=0.25)
    assert learned > 0.62, (learned, ablated)
    assert learned - ablated > LEARNING_MARGIN, (learned, ablated)


@pytest.mark.parametrize("method", METHODS)
def test_a_broken_module_fails_the_learning_check(method, learn_data):
    """The mutation check: with the module's output zeroed while it trains (a method that
    learns nothing), the learning check above must fail."""
    learned, ablated = learning_margin(
        learn_data, method, "4x", part="module", mutate=True, epochs=0.02
    )
    assert not learned - ablated > LEARNING_MARGIN, (learned, ablated)


def test_run_summary_records_the_split(learn_data, tmp_path):
    cfg = RunConfig(
        data=str(learn_data),
        model="deepfm",
        model_options={"hidden": [16]},
        compressor="dhe",
        budget="4x",
        train=TrainConfig(epochs=0.01, batch_size=1024, progress=False),
    )
    summary = train_run(cfg, tmp_path / "dhe")
    assert summary["serve_bytes"] <= summary["budget_bytes"]
    assert summary["hyperparameters"]["table_fields"]  # small fields stay tables
    assert summary["hyperparameters"]["networks"] == "shared"


# ---------------------------------------------------------------- the hybrid helpers
def test_premixed_hash_equals_salted_hash():
    values = torch.tensor([0, 1, 2, 10**12, 2**62])
    mixed = premixed_salts(["C1", "C2"], chunks=3, seed=7, tag="x/")
    got = hash_premixed(values, mixed[1])  # field C2, all chunks
    for c in range(3):
        assert torch.equal(got[:, c], salted_hash(values, stable_salt("x/C2", c, 7)))
    assert bool((got >= 0).all())


def test_pool_bags_sums_bags_like_an_embedding_bag():
    kjt = KeyedJaggedTensor(
        keys=["a", "b"], values=torch.arange(6), lengths=torch.tensor([1, 0, 2, 1, 1, 1])
    )  # 2 keys x 3 samples
    rows = torch.arange(6, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    pooled = pool_bags(rows, kjt)
    expected = torch.tensor([[0.0, 3.0], [0.0, 4.0], [3.0, 5.0]]).unsqueeze(2).repeat(1, 1, 2)
    assert torch.equal(pooled, expected)


def test_router_splits_by_key_and_merges_in_field_order():
    router = FieldRouter(["a", "b", "c"], table_fields=["c", "a"], module_fields=["b"])
    kjt = KeyedJaggedTensor(
        keys=["b", "a", "c"], values=torch.arange(6), lengths=torch.ones(6, dtype=torch.int64)
    )
    to_tables, to_module = router.split(kjt)
    assert to_tables.keys() == ["c", "a"] and to_tables.values().tolist() == [4, 5, 2, 3]
    assert to_module.keys() == ["b"] and to_module.values().tolist() == [0, 1]
    tables = torch.tensor([[1.0, 2.0], [1.0, 2.0]])  # c -> 1, a -> 2 (dim 1)
    merged = router.merge(tables, torch.full((2, 1, 1), 3.0))
    assert merged[:, :, 0].tolist() == [[2.0, 3.0, 1.0]] * 2
    with pytest.raises(KeyError, match="lacks sparse features"):
        router.split(kjt.permute([0, 1]))


def test_collisionless_fields_respect_threshold_and_share():
    features = [
        FeatureSpec("big", 5000),
        FeatureSpec("x", 10),
        FeatureSpec("y", 20),
        FeatureSpec("z", 300),
    ]
    row = DIM * 4
    assert collisionless_fields(features, DIM, 10**9, 200, 0.25) == [1, 2]
    assert collisionless_fields(features, DIM, 10**9, 1000, 0.25) == [1, 2, 3]
    assert collisionless_fields(features, DIM, 4 * 30 * row, 200, 0.25) == [1, 2]
    assert collisionless_fields(features, DIM, 4 * 29 * row, 200, 0.25) == [1]
    assert collisionless_fields(features, DIM, 4 * 9 * row, 200, 0.25) == []
    assert np.all(np.diff(collisionless_fields(features, DIM, 10**9, 10**6, 1.0)) > 0)
