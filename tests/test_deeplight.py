"""deeplight: the pruning schedule, exact final sparsity, fine-tuning with the mask fixed,
exact export bytes and predictions (fp32, and int8/int4 storage), resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pruning_checks import check_artifact, check_resume, config, zeroed_auc

from compressors import FeatureSpec, build_compressor
from compressors.pruning.common import PrunedServing
from compressors.pruning.deeplight import deeplight_sparsity
from ctr.run import load_run_model, train_run


def test_schedule_rises_to_the_target():
    values = [deeplight_sparsity(0.9, t, 100) for t in (0, 100, 1000, 46_000)]
    assert values[0] == 0.0 and values == sorted(values)
    assert values[1] == pytest.approx(0.9 * 0.01)
    assert values[-1] == pytest.approx(0.9, abs=0.01)


def test_magnitude_pruning_keeps_the_largest_entries_exactly():
    layer = build_compressor("deeplight", [FeatureSpec("a", 50), FeatureSpec("b", 30)], 8, "4x")
    layer.prune_to(0.5)
    kept = layer.table.weight.abs()[layer.mask]
    dropped = layer.table.weight.abs()[~layer.mask]
    assert int(layer.mask.sum()) == 320 and kept.min() >= dropped.max()
    layer.prune_to(layer.target_sparsity)
    assert int(layer.mask.sum()) == layer.target_entries


@pytest.mark.parametrize(("storage", "atol"), [("int8", 2e-4), ("int4", 2e-3)])
def test_integer_storage_meets_the_budget_with_exact_bytes(storage, atol):
    from torchrec import KeyedJaggedTensor

    feats = [FeatureSpec("a", 3000), FeatureSpec("b", 40), FeatureSpec("c", 500)]
    layer = build_compressor("deeplight", feats, 8, "6x", storage=storage)
    fp32 = build_compressor("deeplight", feats, 8, "6x")
    if storage == "int8":  # 2 bytes an entry in CSR, not fp32's 5: more entries fit
        assert layer.target_entries > 2 * fp32.target_entries
    layer.prune_to(layer.target_sparsity)
    memory = layer.memory()
    exported = layer.export()
    assert exported.nbytes == memory.serve_bytes <= layer.budget_bytes
    forms = {p["form"] for p in exported.config["plans"]}
    assert ("csr" in forms) == (storage == "int8")  # int4 has no CSR form
    torch.manual_seed(0)
    kjt = KeyedJaggedTensor(
        keys=["a", "b", "c"],
        values=torch.cat([torch.randint(0, 40, (64,)), torch.randint(0, 40, (32,))]),
        lengths=torch.tensor([1] * 32 + [1] * 32 + [1] * 32),
    )
    layer.eval()
    served = PrunedServing(exported)(kjt).view(32, 3, 8)
    assert (served - layer(kjt)).abs().max() < atol  # init weights within ±0.01


@pytest.fixture(scope="module")
def run(learn_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deeplight") / "run"
    train_run(config(learn_data, "deeplight", "5x", decay_steps=4), out)
    return out


def test_pruned_to_the_target_and_finetune_keeps_the_mask(run):
    model, _ = load_run_model(run)
    layer = model.embedding.compressor
    assert int(layer.mask.sum()) == layer.target_entries
    assert layer.nonzeros() <= layer.target_entries
    assert torch.all(layer.all_values()[~layer.mask] == 0)
    assert layer.memory().serve_bytes <= layer.budget_bytes
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history][-1] == "finetune"


def test_deeplight_learns(run, learn_data):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_auc"] > 0.68
    assert zeroed_auc(run, learn_data) < summary["test_auc"] - 0.04


def test_artifact_matches_serve_bytes_and_predictions(run, learn_data, tmp_path):
    check_artifact(run, learn_data, tmp_path / "a", atol=1e-5)


def test_export_at_int8_storage(run, learn_data, tmp_path):
    manifest = check_artifact(run, learn_data, tmp_path / "a", atol=0.05, storage="int8")
    assert manifest["embedding"]["config"]["dtype"] == "int8"
    assert (
        manifest["embedding"]["serve_bytes"] < load_run_model(run)[0].embedding.memory().serve_bytes
    )


def test_each_stage_resumes_after_a_kill(tiny_data, tmp_path):
    cfg = config(tiny_data, "deeplight", "3x", epochs=0.5, decay_steps=2, prune_every=3)
    check_resume(cfg, tmp_path, [5, 12])
