"""qr: budgets, unique (quotient, remainder) pairs, combine ops, export, learning."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, FeatureSpec, build_compressor
from compressors.core.hash64 import salted_hash
from compressors.hashing.qr import QRRule, QuotientRemainderMap
from tests.helpers.table_checks import RATIOS, check_round_trip, criteo_features, quick_train


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_budget_met_or_refused_clearly(op, ratio):
    features = criteo_features()
    if ratio == "1000x":  # 338 rows of budget against Σ 2·√n_f ≈ 1,500 rows at the minimum
        with pytest.raises(BudgetError, match=r"smallest QR layout .* 2\*sqrt\(n\) rows"):
            build_compressor("qr", features, dim=16, budget=ratio, op=op)
        return
    layer = build_compressor("qr", features, dim=16, budget=ratio, op=op)
    memory = layer.memory()
    assert memory.serve_bytes <= layer.budget_bytes
    assert memory.serve_bytes == layer.export().nbytes
    rows = sum(t.rows for t in layer.layout.tables)
    assert memory.train_bytes == memory.serve_bytes + 4 * rows
    if op != "concat":  # concat's smallest m (2) already halves rows of half width: 4x
        assert memory.serve_bytes >= 0.9 * layer.budget_bytes


def test_qr_reaches_1000x_on_the_full_criteo_profile():
    layer = build_compressor("qr", criteo_features(scale=1.0), dim=16, budget="1000x")
    assert layer.memory().ratio >= 1000
    m = layer.hyperparameters()["collisions_per_field"]
    assert m["C3"] > 1000  # 10 M values: quotient and remainder tables of ~3 k rows each


def test_one_collision_count_shrinks_every_field_alike():
    features = criteo_features()
    layer = build_compressor("qr", features, dim=16, budget="10x")
    hp = layer.hyperparameters()
    m = hp["collisions_per_field"]
    assert set(hp["full_fields"]) == {f.name for f in features if f.cardinality <= 200}
    assert max(m.values()) - min(m.values()) <= 1  # one m, the largest fields at m - 1
    for f in features:
        tables = {t.name: t.rows for t in layer.layout.tables}
        if f.name in m:
            assert tables[f"q_{f.name}"] == -(-f.cardinality // m[f.name])
            assert tables[f"r_{f.name}"] == m[f.name]
        else:
            assert tables[f"t_{f.name}"] == f.cardinality


def test_every_value_gets_a_unique_pair():
    features = [FeatureSpec("A", 1000), FeatureSpec("B", 997), FeatureSpec("C", 37)]
    layer = build_compressor("qr", features, dim=8, budget="4x", threshold=0)
    # Sample i holds value i of every field that has one (empty bags after that).
    kjt = KeyedJaggedTensor(
        keys=["A", "B", "C"],
        values=torch.cat([torch.arange(f.cardinality) for f in features]),
        lengths=torch.cat([(torch.arange(1000) < f.cardinality).long() for f in features]),
    )
    rows = layer.index_map(kjt)
    tables = {t.name: t.rows for t in layer.layout.tables}
    for f in features:
        if f"q_{f.name}" not in tables:
            continue
        q, r = rows[f"{f.name}_q"].values(), rows[f"{f.name}_r"].values()
        assert q.max() < tables[f"q_{f.name}"] and r.max() < tables[f"r_{f.name}"]
        pairs = q * tables[f"r_{f.name}"] + r
        assert len(torch.unique(pairs)) == f.cardinality  # injective: no two values collide


def test_index_map_on_multi_hot_bags_and_full_fields():
    index_map = QuotientRemainderMap(
        ["F", "G"], ["F_q", "F_r", "G"], [QRRule(0, 7), QRRule(0, 7, remainder=True), QRRule(1, 1)]
    )
    # Two samples: F bags [15, 6] and [], G bags [100] and [3, 4, 5].
    values = torch.tensor([15, 6, 100, 3, 4, 5])
    kjt = KeyedJaggedTensor(keys=["F", "G"], values=values, lengths=torch.tensor([2, 0, 1, 3]))
    out = index_map(kjt)
    assert out.keys() == ["F_q", "F_r", "G"]
    assert out.values().tolist() == [2, 0, 1, 6, 100, 3, 4, 5]
    assert out.lengths().tolist() == [2, 0, 2, 0, 1, 3]


def test_fingerprint_keys_hash_into_the_pairs_then_split():
    """keys='fingerprint': any int64 (a raw value's 64-bit fingerprint) is hashed into the
    field's ⌈n/m⌉·m pairs, and both lookups split the same hash; keys='id' is unchanged."""
    features = [FeatureSpec("A", 1000), FeatureSpec("S", 10)]
    by_id = build_compressor("qr", features, dim=8, budget="4x")
    keyed = build_compressor("qr", features, dim=8, budget="4x", keys="fingerprint")
    assert by_id.hashed_fields() == [] and keyed.hashed_fields() == ["A"]  # S stays full
    assert by_id.memory().serve_bytes == keyed.memory().serve_bytes
    m = keyed.hyperparameters()["collisions_per_field"]["A"]
    quotients = -(-1000 // m)
    prints = torch.randint(-(2**63), 2**63 - 1, (5000,), generator=torch.Generator().manual_seed(0))
    kjt = KeyedJaggedTensor(
        keys=["A", "S"],
        values=torch.cat([prints, torch.arange(10)]),
        lengths=torch.cat(
            [torch.ones(5000, dtype=torch.int64), torch.zeros(4990), torch.ones(10)]
        ).long(),
    )
    rows = keyed.index_map(kjt)
    q, r = rows["A_q"].values(), rows["A_r"].values()
    salt = keyed.index_map.rules[0].salt
    assert torch.equal(q * m + r, salted_hash(prints, salt) % (quotients * m))
    assert q.min() >= 0 and q.max() == quotients - 1 and r.max() == m - 1  # every row used
    assert rows["S"].values().tolist() == list(range(10))  # the full field reads its ids
    ids = KeyedJaggedTensor(
        keys=["A", "S"], values=torch.tensor([123, 4]), lengths=torch.ones(2).long()
    )
    assert by_id.index_map(ids)["A_q"].values().item() == 123 // m  # id keys: the plain split
    with pytest.raises(ValueError, match="keys must be one of"):
        build_compressor("qr", features, dim=8, budget="4x", keys="raw")


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_combine_ops(op):
    features = [FeatureSpec("A", 1000), FeatureSpec("S", 10)]
    layer = build_compressor("qr", features, dim=8, budget="4x", op=op)
    w = layer.tables.weights()
    v = torch.tensor([123, 999])
    kjt = KeyedJaggedTensor(
        keys=["A", "S"],
        values=torch.tensor([123, 999, 4, 9]),
        lengths=torch.ones(4, dtype=torch.int64),
    )
    emb = layer(kjt)
    m = layer.hyperparameters()["collisions_per_field"]["A"]
    q, r = w["q_A"][v // m], w["r_A"][v % m]
    expected = {"mult": q * r, "add": q + r, "concat": torch.cat([q, r], 1)}[op]
    torch.testing.assert_close(emb[:, 0], expected)
    torch.testing.assert_close(emb[:, 1], w["t_S"][torch.tensor([4, 9])])  # small field: full
    if op == "mult":  # factors at ±√init_scale: products at the scale of other methods' rows
        for table in ("q_A", "r_A"):
            assert w[table].abs().max() <= 0.1 and w[table].abs().max() > 0.05
        assert expected.abs().max() <= 0.01


def test_concat_needs_an_even_dim():
    with pytest.raises(ValueError, match="even dim"):
        build_compressor("qr", [FeatureSpec("A", 1000)], dim=7, budget="4x", op="concat")


@pytest.mark.parametrize("op", ["mult", "concat"])
def test_export_round_trip(tiny_data, tmp_path, op):
    summary = quick_train(tiny_data, tmp_path / "run", "qr", "3x", op=op)
    assert summary["serve_bytes"] <= summary["budget_bytes"]
    check_round_trip(tiny_data, tmp_path / "run", tmp_path / "artifact")
