"""hash and unified: budgets, salts, the vectorised index map, export, learning."""

from __future__ import annotations

import json

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, build_compressor
from compressors.core.hash64 import salted_hash, stable_salt
from compressors.hashing.hash import HashRule, SaltedHashMap, proportional_rows
from tests.helpers.table_checks import RATIOS, check_round_trip, criteo_features, quick_train

VARIANTS = {
    "hash": ("hash", {}),
    "hash-shared": ("hash", {"shared": True}),
    "unified": ("unified", {}),
    "unified-4-tables": ("unified", {"num_tables": 4}),
}


def _kjt(columns: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    """A KJT from per-field lists of bags."""
    values, lengths = [], []
    for bags in columns.values():
        for bag in bags:
            values += bag
            lengths.append(len(bag))
    return KeyedJaggedTensor(
        keys=list(columns),
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )


def _single_hot(features, batch: int = 512, seed: int = 0) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, f.cardinality, (batch,), generator=gen) for f in features])
    return KeyedJaggedTensor(
        keys=[f.name for f in features],
        values=values,
        lengths=torch.ones(len(features) * batch, dtype=torch.int64),
        stride=batch,
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("ratio", RATIOS)
def test_budget_met_and_used(variant, ratio):
    name, options = VARIANTS[variant]
    layer = build_compressor(name, criteo_features(), dim=16, budget=ratio, **options)
    memory = layer.memory()
    assert memory.serve_bytes <= layer.budget_bytes
    assert memory.serve_bytes >= 0.98 * layer.budget_bytes  # the solver spends the budget
    assert memory.serve_bytes == layer.export().nbytes == sum(memory.parts.values())
    # Fused rowwise Adagrad keeps one float per row next to the fp32 rows.
    rows = sum(t.rows for t in layer.layout.tables)
    assert memory.train_bytes == memory.serve_bytes + 4 * rows


def test_per_field_hash_needs_a_row_per_field_and_says_so():
    features = criteo_features()
    with pytest.raises(BudgetError, match="at least one row per field"):
        build_compressor("hash", features, dim=16, budget="20000x")
    layer = build_compressor("hash", features, dim=16, budget="20000x", shared=True)
    assert layer.memory().serve_bytes <= layer.budget_bytes
    with pytest.raises(BudgetError, match="one row"):
        build_compressor("hash", features, dim=16, budget=63)


def test_unified_sub_tables_need_a_row_each():
    with pytest.raises(BudgetError, match=r"sub-table"):
        build_compressor("unified", criteo_features(), dim=16, budget=32 * 3, num_tables=4)


def test_small_fields_stay_whole_while_the_budget_allows():
    features = criteo_features()
    sizes = {f.name: f.cardinality for f in features}
    rows = build_compressor("hash", features, dim=16, budget="10x").hyperparameters()[
        "rows_per_field"
    ]
    for name, n in sizes.items():
        if n <= 200:
            assert rows[name] == n
        else:  # large fields shrink by one common ratio
            assert rows[name] == pytest.approx(n * rows["C3"] / sizes["C3"], rel=0.02, abs=2)
    # 1000x cannot hold every small field whole: the smallest stay whole, greedily, while
    # they take at most half the rows (keep_share), the rest are hashed.
    layer = build_compressor("hash", features, dim=16, budget="1000x")
    rows = layer.hyperparameters()["rows_per_field"]
    capacity = layer.budget_bytes // (16 * 4)
    whole = [n for n in sizes if rows[n] == sizes[n]]
    hashed = [n for n in sizes if rows[n] < sizes[n]]
    assert whole and hashed
    assert max(sizes[n] for n in whole) <= min(sizes[n] for n in hashed)  # smallest first
    assert sum(sizes[n] for n in whole) <= 0.5 * capacity
    next_smallest = min(sizes[n] for n in hashed)
    assert sum(sizes[n] for n in whole) + next_smallest > 0.5 * capacity or next_smallest > 200
    # keep_share=0 is plain hashing of every field.
    none = build_compressor("hash", features, dim=16, budget="1000x", keep_share=0.0)
    assert all(r < sizes[n] for n, r in none.hyperparameters()["rows_per_field"].items())
    unified = build_compressor("unified", features, dim=16, budget="10x", threshold=200)
    assert set(unified.hyperparameters()["kept_fields"]) == {
        n for n, s in sizes.items() if s <= 200
    }


def test_proportional_rows():
    assert proportional_rows([100, 1000, 10], 555) == [50, 500, 5]
    rows = proportional_rows([7, 300, 1], 40)
    assert sum(rows) == 40 and rows[2] == 1 and rows[0] >= 1
    assert proportional_rows([5, 6], 100) == [5, 6]
    with pytest.raises(ValueError):
        proportional_rows([5, 6], 1)


def test_salts_are_independent_across_fields_and_chunks():
    ids = list(range(2000))
    # Two fields with identical vocabularies: the same ids must collide differently.
    hashed = {"A": [[v] for v in ids], "B": [[v] for v in ids]}
    rules = [
        HashRule.hashed(0, 64, 0, stable_salt("A")),
        HashRule.hashed(1, 64, 0, stable_salt("B")),
    ]
    rows = SaltedHashMap(["A", "B"], ["A", "B"], rules)(_kjt(hashed)).values().view(2, -1)
    a, b = rows[0], rows[1]
    same_a, same_b = a[:, None] == a[None, :], b[:, None] == b[None, :]
    pairs_a = (same_a.sum() - len(ids)) / 2
    both = ((same_a & same_b).sum() - len(ids)) / 2
    assert not torch.equal(a, b)
    assert both < 2 * pairs_a / 64  # independent: a colliding pair collides again w.p. 1/64
    # Unified: a field's two probes use independent salts, so few values lose both.
    layer = build_compressor("unified", criteo_features(), dim=16, budget="1000x")
    n = 4000
    values = torch.cat([torch.arange(n) % f.cardinality for f in layer.features])
    kjt = KeyedJaggedTensor(
        keys=layer.feature_names,
        values=values,
        lengths=torch.ones(len(layer.features) * n, dtype=torch.int64),
    )
    probes = layer.index_map(kjt).values().view(-1, 2, n)
    c0, c1 = probes[layer.feature_names.index("C3")]  # 101,312 values: ids 0..3999 distinct
    buckets = layer.layout.tables[0].rows
    same0, same1 = c0[:, None] == c0[None, :], c1[:, None] == c1[None, :]
    pairs0 = (same0.sum() - n) / 2
    both = ((same0 & same1).sum() - n) / 2
    assert not torch.equal(c0, c1)
    assert pairs0 > n * n / 4 / buckets  # plenty of single collisions ...
    assert both < 2 * pairs0 / buckets + 5  # ... but a pair collides in both probes w.p. 1/M


def test_index_map_matches_the_scalar_hash_on_multi_hot_bags():
    features = ["F", "G"]
    rules = [
        HashRule.hashed(0, 97, 5, stable_salt("F", 0)),
        HashRule.hashed(0, 31, 0, stable_salt("F", 1)),
        HashRule(1, 1, 4, 100, 13, 103, stable_salt("G")),
    ]  # head [1, 4), tail buckets
    index_map = SaltedHashMap(features, ["F_c0", "F_c1", "G"], rules)
    bags = {"F": [[3, 70000], [], [12]], "G": [[0, 1, 2, 3], [4], [9, 9]]}
    out = index_map(_kjt(bags))
    assert out.keys() == ["F_c0", "F_c1", "G"]
    f = torch.tensor([3, 70000, 12])
    g = torch.tensor([0, 1, 2, 3, 4, 9, 9])
    expected_g = torch.where(
        (g >= 1) & (g < 4), g - 1 + 100, salted_hash(g, stable_salt("G")) % 13 + 103
    )
    expected = torch.cat(
        [
            salted_hash(f, stable_salt("F", 0)) % 97 + 5,
            salted_hash(f, stable_salt("F", 1)) % 31,
            expected_g,
        ]
    )
    assert torch.equal(out.values(), expected)
    assert out.lengths().tolist() == [2, 0, 1, 2, 0, 1, 4, 1, 2]
    # The rebuilt map (serving) gives the same rows.
    rebuilt = SaltedHashMap.from_config(json.loads(json.dumps(index_map.to_config())), {})
    assert torch.equal(rebuilt(_kjt(bags)).values(), expected)


def test_unified_concatenates_independent_probes():
    layer = build_compressor("unified", criteo_features(), dim=16, budget="100x", num_tables=2)
    kjt = _single_hot(layer.features, batch=64)
    emb = layer(kjt)
    rows = layer.index_map(kjt)
    weights = layer.tables.weights()
    for lookup in layer.layout.lookups:
        start = lookup.start
        width = weights[lookup.table].shape[1]
        expected = weights[lookup.table][rows[lookup.key].values()]
        assert torch.equal(emb[:, lookup.field, start : start + width], expected)
    tables = [lk.table for lk in layer.layout.lookups if lk.table != "direct"]
    assert tables[:4] == ["unified_d8_0", "unified_d8_1"] * 2  # dealt round-robin
    sizes = [t.rows for t in layer.layout.tables if t.name.startswith("unified")]
    assert max(sizes) - min(sizes) <= 1


def test_unified_per_field_chunks():
    features = criteo_features()
    layer = build_compressor(
        "unified", features, dim=16, budget="100x", field_chunks={"C3": 4, "C12": 1}
    )
    widths = {t.name: t.dim for t in layer.layout.tables}
    assert {"unified_d8_0", "unified_d4_0", "unified_d16_0"} <= set(widths)
    assert sum(lk.key.startswith("C3_") for lk in layer.layout.lookups) == 4
    assert layer.memory().serve_bytes <= layer.budget_bytes
    assert layer(_single_hot(features, batch=8)).shape == (8, len(features), 16)
    with pytest.raises(ValueError, match="divide"):
        build_compressor("unified", features, dim=16, budget="100x", field_chunks={"C3": 3})
    with pytest.raises(ValueError, match="unknown fields"):
        build_compressor("unified", features, dim=16, budget="100x", field_chunks={"X": 2})


def test_rows_are_stable_across_processes_and_versions():
    # Golden rows computed once in another process: salts are digests of names, never
    # Python's per-process randomised hash(), so a model trained anywhere serves anywhere.
    ids = torch.tensor([0, 1, 2, 3, 12345, 2**40])
    golden = {
        "hash": {
            "C1": [0, 1, 2, 3, 26, 11],
            "C3": [137, 252, 598, 639, 532, 402],
            "C4": [93, 97, 45, 167, 123, 64],
        },
        "unified": {
            "C3_c0": [4424, 3186, 4485, 118, 2626, 2138],
            "C3_c1": [24, 395, 137, 2388, 3202, 5172],
        },
    }
    for name, expected in golden.items():
        # The golden rows were taken with small fields kept out (threshold 200 for both).
        layer = build_compressor(name, criteo_features(), 16, "100x", threshold=200)
        kjt = KeyedJaggedTensor(
            keys=layer.feature_names,
            values=ids.repeat(26),
            lengths=torch.ones(26 * len(ids), dtype=torch.int64),
        )
        rows = layer.index_map(kjt)
        assert {k: rows[k].values().tolist() for k in expected} == expected


@pytest.mark.parametrize(
    ("variant", "atol"),
    [
        ("hash", 0.0),
        ("unified-4-tables", 0.0),
        ("unified-int8", 0.02),  # rows served row-wise int8: a stated tolerance on the logits
    ],
)
def test_export_round_trip(tiny_data, tmp_path, variant, atol):
    name, options = VARIANTS.get(variant, ("unified", {"storage": "int8"}))
    summary = quick_train(tiny_data, tmp_path / "run", name, "10x", **options)
    assert summary["serve_bytes"] <= summary["budget_bytes"]
    check_round_trip(tiny_data, tmp_path / "run", tmp_path / "artifact", atol=atol)
