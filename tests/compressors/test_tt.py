"""TT-Rec specifics: factorisation, row reconstruction, rank solving, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, FeatureSpec, build_compressor
from compressors.core.storage import TableSpec
from compressors.hashing.tt import (
    TTCores,
    TTEmbedding,
    TTShape,
    factor_dim,
    factor_rows,
    solve_rank,
)
from tests.helpers.features import criteo_features


@pytest.mark.parametrize("n", [1, 2, 3, 4, 33, 126, 932, 22027, 101313, 10**7])
def test_row_factors_cover_the_field_near_the_cube_root(n):
    n1, n2, n3 = factor_rows(n)
    assert n1 * n2 * n3 >= n
    assert n2 == min(n1, n2, n3)  # the r²-weighted middle core gets the smallest factor
    assert max(n1, n2, n3) <= math.ceil(n ** (1 / 3)) + 1
    assert n1 * n2 * n3 <= 1.15 * n + 8  # little padding


@pytest.mark.parametrize(
    ("dim", "expected"),
    [
        (16, (2, 2, 4)),
        (8, (2, 2, 2)),
        (32, (4, 2, 4)),
        (64, (4, 4, 4)),
        (7, (1, 1, 7)),
        (12, (2, 2, 3)),
    ],
)
def test_dim_factors_are_exact_and_balanced(dim, expected):
    assert factor_dim(dim) == expected
    assert math.prod(factor_dim(dim)) == dim


def test_rows_equal_the_explicit_core_contraction():
    torch.manual_seed(0)
    cores = TTCores(TTShape((5, 3, 6), (2, 2, 4)), rank=4, init_std=1.0)
    ids = torch.tensor([0, 1, 17, 89, 17, 45, 0])
    rows = cores(ids)
    g0, g1, g2 = cores.core0, cores.core1, cores.core2
    for k, v in enumerate(ids.tolist()):
        i1, i2, i3 = v // 18, (v // 6) % 3, v % 6
        block = torch.einsum("ar,rbs,sc->abc", g0[i1], g1[i2], g2[i3]).flatten()
        torch.testing.assert_close(rows[k], block)
    torch.testing.assert_close(rows, cores.full_table()[ids])


def test_multi_hot_bags_sum_their_rows():
    torch.manual_seed(0)
    module = TTEmbedding(
        ["a", "b"], 16, [TTShape.for_field(50, 16), TTShape.for_field(9, 16)], rank=3
    )
    kjt = KeyedJaggedTensor(
        keys=["a", "b"], values=torch.tensor([3, 4, 49, 8, 8]), lengths=torch.tensor([2, 1, 0, 2])
    )  # a: [3,4],[49]; b: [],[8,8]
    out = module(kjt)
    table_a, table_b = (c.full_table() for c in module.cores)
    torch.testing.assert_close(out[0, 0], table_a[3] + table_a[4])
    torch.testing.assert_close(out[1, 0], table_a[49])
    assert torch.equal(out[0, 1], torch.zeros(16))
    torch.testing.assert_close(out[1, 1], 2 * table_b[8])


def test_gaussian_init_gives_the_requested_entry_std():
    torch.manual_seed(0)
    cores = TTCores(TTShape.for_field(20000, 16), rank=8, init_std=0.05)  # the default init
    assert cores.full_table().std().item() == pytest.approx(0.05, rel=0.2)


def test_approx_normal_init_is_the_references_reversed_truncated_normal():
    torch.manual_seed(0)
    n = 20000
    cores = TTCores(TTShape.for_field(n, 16), rank=8, init="approx-normal", rows=n)
    scale = (3 * n) ** (-1 / 6)
    entries = torch.cat([p.detach().flatten() for p in cores.parameters()]) / scale
    assert entries.abs().min().item() >= 2.0 - 1e-5  # only the tails |x| >= 2
    assert (entries > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    # E[x^2 | |x| >= 2] = 1 + 2·φ(2)/Φ(-2) = 5.75 for a standard normal.
    assert entries.pow(2).mean().item() == pytest.approx(5.75, rel=0.03)
    with pytest.raises(ValueError, match="init must be one of"):
        TTCores(TTShape.for_field(n, 16), rank=8, init="uniform")


def test_rank_one_is_refused_unless_allowed():
    features = criteo_features()
    with pytest.raises(BudgetError, match="Kronecker product.*min_rank=1"):
        build_compressor("tt", features, 16, "1000x")
    assert build_compressor("tt", features, 16, "1000x", min_rank=1).rank == 1


def test_rank_grows_with_the_budget_and_cheap_fields_stay_tables():
    features = criteo_features()
    ranks = [
        build_compressor("tt", features, 16, f"{r}x", min_rank=1).rank for r in (1000, 100, 10, 2)
    ]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]
    rank, tables = solve_rank(features, 16, 216_250, max_rank=64, min_rank=1)
    for i, f in enumerate(features):
        cores = TTShape.for_field(f.cardinality, 16).nbytes(rank)
        if TableSpec("t", f.cardinality, 16).serve_bytes <= cores:
            assert i in tables  # never factorise a field whose table is smaller
    with pytest.raises(BudgetError, match="even rank"):  # one rank more does not fit
        solve_rank(features, 16, 216_250, max_rank=rank + 1, min_rank=rank + 1)


def test_memory_counts_cores_and_adam_state_exactly():
    features = [FeatureSpec("big", 5000), FeatureSpec("small", 10)]
    layer = build_compressor("tt", features, 16, "5x")
    memory = layer.memory()
    shape = TTShape.for_field(5000, 16)
    assert layer.hyperparameters()["tt_fields"] == ["big"]
    assert memory.parts["tt.big"] == shape.nbytes(layer.rank)
    table = TableSpec("t_small", 10, 16)
    assert memory.serve_bytes == shape.nbytes(layer.rank) + table.serve_bytes
    assert memory.train_bytes == 3 * shape.nbytes(layer.rank) + table.train_bytes("rowwise_adagrad")
