"""pep: soft thresholds that prune to the budget's sparsity, a lottery-ticket retrain with the
found mask, exact export bytes and predictions, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pruning_checks import check_artifact, check_resume, config, zeroed_auc

from compressors import BudgetError, FeatureSpec, build_compressor
from compressors.pruning.pep import PEP, soft_threshold
from ctr.run import load_run_model, train_run


def test_soft_threshold_formula_and_gradients():
    w = torch.tensor([-0.5, -0.05, 0.0, 0.02, 0.3], requires_grad=True)
    s = torch.tensor(-2.0, requires_grad=True)
    g = torch.sigmoid(s)
    out = soft_threshold(w, g)
    expected = torch.sign(w) * torch.clamp(w.abs() - g, min=0)
    torch.testing.assert_close(out, expected)
    assert out[1] == 0 and out[3] == 0 and out[4] > 0
    out[4].backward()  # d/ds of (0.3 - g(s)) = -g'(s)
    torch.testing.assert_close(s.grad, -g.detach() * (1 - g.detach()))


def test_budget_becomes_a_number_of_entries():
    feats = [FeatureSpec("a", 1000), FeatureSpec("b", 200)]
    plan = PEP.solve_budget(feats, 16, 20_000)
    # 5 bytes per fp32 entry (value + uint8 column), 4 per row pointer.
    assert plan["target_entries"] == (20_000 - (1001 + 201) * 4) // 5
    assert build_compressor("pep", feats, 16, 20_000).target_entries == plan["target_entries"]
    with pytest.raises(BudgetError, match="row pointers"):
        build_compressor("pep", feats, 16, "20x")
    with pytest.raises(ValueError, match="storage"):
        build_compressor("pep", feats, 16, "2x", storage="int8")
    per_dim = build_compressor("pep", feats, 16, "2x", granularity="field_dim")
    assert per_dim.threshold.shape == (2, 16)


@pytest.fixture(scope="module")
def run(learn_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pep") / "run"
    train_run(config(learn_data, "pep", "5x", threshold_lr=0.05), out)
    return out


def test_thresholds_prune_to_the_budget_and_retrain_keeps_the_mask(run):
    model, _ = load_run_model(run)
    layer = model.embedding.compressor
    assert bool(layer.found) and (layer.threshold != -6.0).all()  # thresholds moved
    assert layer.nonzeros() <= layer.target_entries
    assert int(layer.mask.sum()) <= layer.target_entries
    initial = torch.load(run / "initial.pt", weights_only=True)["embedding.compressor.table.weight"]
    w = layer.table.weight
    assert torch.equal(w[~layer.mask], initial[~layer.mask])  # pruned entries never trained
    assert not torch.equal(w[layer.mask], initial[layer.mask])  # the ticket retrained
    assert layer.memory().serve_bytes <= layer.budget_bytes


def test_pep_learns(run, learn_data):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_auc"] > 0.66
    assert zeroed_auc(run, learn_data) < summary["test_auc"] - 0.04


def test_artifact_matches_serve_bytes_and_predictions(run, learn_data, tmp_path):
    manifest = check_artifact(run, learn_data, tmp_path / "a", atol=1e-5)
    forms = {p["form"] for p in manifest["embedding"]["config"]["plans"]}
    assert forms <= {"csr", "rows", "dense", "empty"} and forms


def test_fp16_storage_and_field_dim_thresholds(learn_data, tmp_path):
    out = tmp_path / "run"
    train_run(
        config(learn_data, "pep", "3x", epochs=0.1, storage="fp16", granularity="field_dim"), out
    )
    model, _ = load_run_model(out)
    assert model.embedding.memory().serve_bytes <= model.embedding.compressor.budget_bytes
    check_artifact(out, learn_data, tmp_path / "a", atol=1e-2)


def test_each_stage_resumes_after_a_kill(tiny_data, tmp_path):
    cfg = config(tiny_data, "pep", "3x", epochs=0.5, check_every=2, threshold_lr=0.2)
    check_resume(cfg, tmp_path, [5, 12])
