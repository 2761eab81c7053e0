"""deeplight: the pruning schedule (over the stage, with a dense warm-up) followed in a run,
regrowth, exact final sparsity, fine-tuning with the mask fixed, exact export bytes and
predictions (fp32, and int8/int4 storage), resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from compressors import FeatureSpec, build_compressor
from compressors.pruning.deeplight import DeepLight, deeplight_sparsity, stage_sparsity
from compressors.pruning.serving import PrunedServing
from ctr.training.run import load_run_model, train_run
from tests.helpers.pruning_checks import check_artifact, check_resume, config, zeroed_auc


def test_schedule_rises_to_the_target():
    values = [deeplight_sparsity(0.9, t, 100) for t in (0, 100, 1000, 46_000)]
    assert values[0] == 0.0 and values == sorted(values)
    assert values[1] == pytest.approx(0.9 * 0.01)
    assert values[-1] == pytest.approx(0.9, abs=0.01)


def test_stage_schedule_is_the_papers_curve_fitted_to_the_stage():
    total, s = 1000, 0.9
    values = [stage_sparsity(s, t, total, 0.2, 0.8) for t in range(total + 1)]
    assert values == sorted(values)
    assert max(values[:200]) == 0.0  # dense warm-up
    assert values[800:] == [s] * 201  # the target from target_at on
    # The paper's curve rescaled in time: its 99% point (t = 100·ln 0.01 / ln 0.99) lands
    # at target_at, so a point x of the way there reads the paper's value at x of 458 steps.
    paper99 = 100 * math.log(0.01) / math.log(0.99)
    for x in (0.1, 0.25, 0.5):
        t = 200 + x * 600
        assert stage_sparsity(s, t, total, 0.2, 0.8) == pytest.approx(
            deeplight_sparsity(s, x * paper99, 100) / 0.99
        )


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


def _recorded_run(data: Path, out: Path, **options) -> list[tuple[int, int, torch.Tensor]]:
    """Trains ``options``' deeplight run, recording after every prune-stage step the stage
    step, the stage's length and the mask (cloned)."""
    record = []
    after_step = DeepLight.after_step

    def recording(self, ctx):
        after_step(self, ctx)
        if ctx.stage.name == "prune":
            record.append((ctx.stage_step + 1, ctx.stage_steps, self.mask.clone()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DeepLight, "after_step", recording)
        train_run(config(data, "deeplight", "5x", **options), out)
    return record


@pytest.fixture(scope="module")
def recorded(learn_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("deeplight") / "run"
    return out, _recorded_run(learn_data, out, prune_every=4)


@pytest.fixture(scope="module")
def run(recorded) -> Path:
    return recorded[0]


def test_the_run_follows_the_schedule_and_reaches_the_target_before_the_stage_ends(recorded):
    # Mutation: without the gradual pruning (after_step not pruning) the mask stays dense
    # until the stage's end prunes everything at once, and this fails.
    out, record = recorded
    layer = load_run_model(out)[0].embedding.compressor
    n, target = layer.mask.numel(), layer.target_entries
    total = record[0][1]
    assert len(record) == total > 40
    sparsity = [(t, 1 - int(m.sum()) / n) for t, _, m in record]
    for t, s in sparsity:
        expected = stage_sparsity(layer.target_sparsity, t - t % 4, total, 0.2, 0.8)
        assert s == pytest.approx(expected, abs=1e-3), (t, s, expected)
    assert [s for t, s in sparsity if t < 0.2 * total] == [0.0] * len(
        [t for t, _ in sparsity if t < 0.2 * total]
    )
    middle = [s for t, s in sparsity if 0.3 * total < t < 0.7 * total]
    assert middle and 0.2 * layer.target_sparsity < min(middle)
    assert max(middle) < layer.target_sparsity
    # The schedule itself reached the budget: the stage's end has nothing left to prune.
    assert int(record[-1][2].sum()) == target


def test_pruned_entries_regrow_until_the_stage_ends(recorded, learn_data, tmp_path):
    # regrow (default): every pass ranks all entries, so some entry pruned by one pass is
    # back after a later one; regrow=False never revives one (each mask inside the last).
    masks = [m for _, _, m in recorded[1]]
    revived = sum(int((b & ~a).sum()) for a, b in zip(masks, masks[1:], strict=False))
    assert revived > 0
    fixed = [m for _, _, m in _recorded_run(learn_data, tmp_path / "r", regrow=False, epochs=0.1)]
    assert all(bool((b <= a).all()) for a, b in zip(fixed, fixed[1:], strict=False))


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
    cfg = config(tiny_data, "deeplight", "3x", epochs=0.5, prune_every=3)
    check_resume(cfg, tmp_path, [5, 12])
