"""adapt: budgets, the frequency split, the head/tail index map, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, FeatureSpec, build_compressor
from compressors.hashing.adapt import frequency_heads
from tests.helpers.table_checks import RATIOS, check_round_trip, criteo_features, quick_train


@pytest.mark.parametrize("shared_tail", [False, True])
@pytest.mark.parametrize("zipf", [True, False])
@pytest.mark.parametrize("ratio", RATIOS)
def test_budget_met_and_used(ratio, zipf, shared_tail):
    layer = build_compressor(
        "adapt", criteo_features(zipf=zipf), dim=16, budget=ratio, shared_tail=shared_tail
    )
    memory = layer.memory()
    assert memory.serve_bytes <= layer.budget_bytes
    assert memory.serve_bytes >= 0.98 * layer.budget_bytes
    assert memory.serve_bytes == layer.export().nbytes
    rows = sum(t.rows for t in layer.layout.tables)
    assert memory.train_bytes == memory.serve_bytes + 4 * rows
    hp = layer.hyperparameters()
    heads = sum(stop - start for start, stop in hp["head_per_field"].values())
    assert heads < rows  # a real hybrid: frequent rows plus hashed buckets
    assert (hp["head_coverage"] is not None) == zipf


def test_budget_too_small_for_a_bucket_per_field():
    features = criteo_features()
    with pytest.raises(BudgetError, match="every field needs a tail bucket"):
        build_compressor("adapt", features, dim=16, budget=25 * 64)
    layer = build_compressor("adapt", features, dim=16, budget=25 * 64, shared_tail=True)
    assert layer.memory().serve_bytes <= 25 * 64


def test_heads_are_the_globally_most_frequent_values():
    features = criteo_features(zipf=True)
    layer = build_compressor("adapt", features, dim=16, budget="100x", threshold=0)
    heads = layer.hyperparameters()["head_per_field"]
    in_head, in_tail = [], []
    for f in features:
        start, stop = heads[f.name]
        ids = np.arange(f.cardinality)
        chosen = (ids >= start) & (ids < stop)
        in_head.append(f.frequencies[chosen])
        in_tail.append(f.frequencies[~chosen])
        assert start == (0 if stop == 0 else 1)  # the OOV id never occurs in train: hashed
    assert np.concatenate(in_head).min() >= np.concatenate(in_tail).max()
    rows = sum(t.rows for t in layer.layout.tables)
    assert sum(len(h) for h in in_head) == pytest.approx(rows / 2, abs=1)  # tail_fraction 0.5


def test_a_frequent_oov_id_owns_a_row():
    counts = np.array([500.0, 400, 300, 3, 2, 1, 1, 1, 1, 1])
    features = [
        FeatureSpec("A", 10, frequencies=counts),
        FeatureSpec("B", 10, frequencies=np.array([0.0, 450, 350, 1, 1, 1, 1, 1, 1, 1])),
    ]
    assert frequency_heads(features, 5, [True, True]) == [(0, 3), (1, 3)]
    assert frequency_heads(features, 5, [False, True]) == [(0, 0), (1, 6)]
    no_counts = [FeatureSpec("A", 100), FeatureSpec("B", 300)]
    assert frequency_heads(no_counts, 40, [True, True]) == [(0, 10), (0, 30)]


def test_head_ids_own_rows_and_the_tail_hashes_into_buckets():
    features = criteo_features(zipf=True)
    layer = build_compressor("adapt", features, dim=16, budget="100x", threshold=0)
    big = features[2]  # 101,312 values
    start, stop = layer.hyperparameters()["head_per_field"][big.name]
    buckets = layer.hyperparameters()["tail_per_field"][big.name]
    ids = torch.arange(big.cardinality)
    lengths = torch.zeros(len(features), big.cardinality, dtype=torch.int64)
    lengths[2] = 1  # one id per sample in the big field, empty bags elsewhere
    kjt = KeyedJaggedTensor(
        keys=[f.name for f in features], values=ids, lengths=lengths.reshape(-1)
    )
    rows = layer.index_map(kjt)[big.name].values()
    head = (ids >= start) & (ids < stop)
    assert torch.equal(rows[head], torch.arange(stop - start))  # own, distinct rows
    tail = rows[~head]
    assert tail.min() >= stop - start and tail.max() < stop - start + buckets
    assert len(torch.unique(tail)) == buckets  # the tail spreads over every bucket


@pytest.mark.parametrize("shared_tail", [False, True])
def test_export_round_trip(tiny_data, tmp_path, shared_tail):
    summary = quick_train(tiny_data, tmp_path / "run", "adapt", "10x", shared_tail=shared_tail)
    assert summary["serve_bytes"] <= summary["budget_bytes"]
    check_round_trip(tiny_data, tmp_path / "run", tmp_path / "artifact")


def test_integer_counts_give_the_float_pooled_heads_without_a_copy(monkeypatch):
    """Integer counts are bisected from the mapped counts in chunks (no pooled float64
    copy, ~32 bytes per id at build time) and give the heads of the pooled partition."""
    from compressors.hashing import adapt as adapt_mod

    rng = np.random.default_rng(7)
    monkeypatch.setattr(adapt_mod, "_SCAN_CHUNK", 5)
    for trial in range(40):
        cards = rng.integers(1, 30, size=rng.integers(1, 5))
        counts = [rng.integers(0, 6, n) * rng.integers(1, 3) for n in cards]
        ints = [FeatureSpec(f"C{i}", len(c), frequencies=c) for i, c in enumerate(counts)]
        floats = [
            FeatureSpec(f"C{i}", len(c), frequencies=c.astype(np.float64))
            for i, c in enumerate(counts)
        ]
        eligible = [bool(x) for x in rng.integers(0, 2, len(cards))]
        for slots in range(0, int(sum(cards)) + 2):
            assert frequency_heads(ints, slots, eligible) == frequency_heads(
                floats, slots, eligible
            ), (trial, slots)
    # The float path is what pools a copy; the integer one never calls it.
    monkeypatch.setattr(adapt_mod.np, "concatenate", None)
    assert frequency_heads(ints, 3, [True] * len(ints))
