"""mde: the power-law solver (pure arithmetic), budgets, export, resume, learning."""

from __future__ import annotations

import pytest
import torch

from compressors import BudgetError, build_compressor, build_serving
from compressors.dimension.mde import block_popularity, power_dims, solve_mde
from tests.helpers.dimension_checks import check_export, check_resume_chain, random_kjt, train_model
from tests.helpers.table_checks import criteo_features


@pytest.mark.parametrize("storage", ["fp32", "int8"])
@pytest.mark.parametrize("ratio", ["2x", "5x", "10x"])
def test_solver_meets_the_budget_and_the_built_method_matches_it(ratio, storage):
    features = criteo_features(zipf=True)
    layer = build_compressor("mde", features, dim=16, budget=ratio, storage=storage)
    plan = solve_mde(features, 16, layer.budget_bytes, storage=storage)
    memory = layer.memory()
    assert plan["serve_bytes"] == memory.serve_bytes == layer.export().nbytes
    assert plan["train_bytes"] == memory.train_bytes
    assert memory.serve_bytes <= layer.budget_bytes
    if plan["alpha"] > 0:  # α is the smallest that fits (at 2x int8 every block has d0)
        assert memory.serve_bytes >= 0.8 * layer.budget_bytes
    for dims in plan["dims"]:
        assert all(d & (d - 1) == 0 for d in dims)  # powers of two
        assert dims == sorted(dims, reverse=True)  # popular blocks are never narrower
    assert max(max(d) for d in plan["dims"]) == plan["base_dim"]


def test_power_rule_and_smaller_alpha_with_more_budget():
    popularity = [[100.0, 10.0, 1.0], [25.0]]
    assert power_dims(popularity, 0.5, 16, 1, True, "fp32") == [[16, 4, 2], [8]]
    assert power_dims(popularity, 0.0, 16, 1, True, "fp32") == [[16, 16, 16], [16]]
    features = criteo_features(zipf=True)
    full = sum(f.cardinality for f in features) * 64
    alphas = [solve_mde(features, 16, full // r)["alpha"] for r in (2, 5, 10)]
    assert alphas == sorted(alphas) and alphas[0] < alphas[-1]
    assert block_popularity(features[0], [0, 1, features[0].cardinality])[0] == 0.0  # OOV


def test_out_of_reach_budget_is_a_clear_error():
    with pytest.raises(BudgetError, match="mde: even 1-dim blocks need"):
        build_compressor("mde", criteo_features(zipf=True), dim=16, budget="20x")


def test_multi_hot_serving_matches_training_at_every_storage():
    features = criteo_features(scale=0.001, zipf=True)
    kjt = random_kjt(features, batch=16)
    for storage, atol in (("fp32", 1e-6), ("fp16", 1e-3), ("int8", 1e-3)):
        layer = build_compressor("mde", features, dim=16, budget="5x", storage=storage)
        served = build_serving(layer.export())(kjt)
        torch.testing.assert_close(served, layer(kjt).detach(), atol=atol, rtol=0)


def test_training_resumes_and_exports(tiny_data, tmp_path):
    run = check_resume_chain(tiny_data, tmp_path, "mde", [3])
    check_export(tiny_data, run, tmp_path / "artifact")


def test_learns_at_10x(learn_data):
    _, metrics = train_model(learn_data, "mde", "10x", 0.2)
    assert metrics["auc"] > 0.70, metrics  # zeroed tables or projections fail this
