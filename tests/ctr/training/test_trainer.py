"""Trainer: learning quality, exact resume, early stopping, stage hooks, run directories."""

import json

import pytest
import torch

from compressors.baseline.full import Full
from compressors.core.base import Stage
from compressors.core.registry import COMPRESSORS
from ctr.training.run import RunConfig, RunError, train_run
from ctr.training.trainer import TrainConfig

SMALL_MLP = {"hidden": [64, 64]}


def _config(data, **train):
    defaults = dict(epochs=1, batch_size=512, progress=False, eval_every=3)
    return RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [16]},
        dim=8,
        train=TrainConfig(**{**defaults, **train}),
    )


def test_deepfm_gets_within_002_auc_of_the_teacher(learn_data, tmp_path):
    cfg = RunConfig(
        data=str(learn_data),
        model="deepfm",
        model_options=SMALL_MLP,
        dim=16,
        train=TrainConfig(epochs=3, batch_size=1024, progress=False, patience=1),
    )
    summary = train_run(cfg, tmp_path / "run")
    teacher = summary["teacher_test_auc"]
    assert summary["test_auc"] > teacher - 0.02, (summary["test_auc"], teacher)
    assert summary["test_auc"] <= teacher + 0.005  # the teacher is the ceiling
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in (
        "test_auc",
        "test_logloss",
        "valid_auc",
        "serve_bytes",
        "train_bytes",
        "full_bytes",
        "budget_bytes",
        "compressor",
        "model",
        "samples_per_sec",
    ):
        assert key in saved
    assert saved["serve_bytes"] == saved["full_bytes"] == saved["budget_bytes"]


def test_resumed_run_equals_uninterrupted_run(tiny_data, tmp_path):
    whole = train_run(_config(tiny_data, epochs=2), tmp_path / "whole")
    first = train_run(_config(tiny_data, epochs=2, max_steps=5), tmp_path / "split")
    assert first == {"finished": False, "steps": 5}
    assert (tmp_path / "split" / "checkpoint.pt").exists()
    resumed = train_run(_config(tiny_data, epochs=2), tmp_path / "split")
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert whole["test_logloss"] == resumed["test_logloss"]
    lines = lambda d: (tmp_path / d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert lines("whole") == lines("split")


def test_checkpoint_restores_fused_optimizer_state(tiny_data, tmp_path):
    train_run(_config(tiny_data, max_steps=4), tmp_path / "r")
    payload = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    table_states = payload["optimizers"]["tables0"]["state"]
    momentum = next(iter(next(iter(table_states.values())).values()))
    assert momentum.abs().sum() > 0  # rowwise Adagrad accumulators were saved
    assert payload["state"]["step"] == 4


def test_early_stopping_restores_the_best_weights(tiny_data, tmp_path):
    summary = train_run(
        _config(tiny_data, epochs=3, eval_every=1, patience=1, lr=0.5, table_lr=2.0), tmp_path / "r"
    )
    history = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] < 3 * 7  # stopped before 3 epochs of 7 batches
    aucs = [h["valid_auc"] for h in history]
    assert aucs[-1] <= max(aucs[:-1])
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    final = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert summary["valid_auc"] == pytest.approx(max(aucs), abs=1e-9)


class _StagedFull(Full):
    """`full` with an extra non-training stage, recording hook calls."""

    name = "staged_full_for_tests"
    stages = (Stage("warmup", epochs=0.5), Stage("inspect", trains=False), Stage("finetune"))
    calls: list[str] = []

    def on_stage_start(self, stage, ctx):
        self.calls.append(f"start:{stage.name}")

    def run_stage(self, stage, ctx):
        metrics = ctx.evaluate("valid")
        self.calls.append(f"run:{stage.name}:{sorted(metrics)}")

    def after_step(self, ctx):
        if not self.calls or self.calls[-1] != "step":
            self.calls.append("step")

    def on_stage_end(self, stage, ctx):
        self.calls.append(f"end:{stage.name}")


def test_stages_run_in_order_with_hooks(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(COMPRESSORS, _StagedFull.name, _StagedFull)
    _StagedFull.calls = []
    cfg = _config(tiny_data)
    cfg.compressor = _StagedFull.name
    summary = train_run(cfg, tmp_path / "r")
    assert _StagedFull.calls == [
        "start:warmup",
        "step",
        "end:warmup",
        "start:inspect",
        "run:inspect:['auc', 'logloss']",
        "end:inspect",
        "start:finetune",
        "step",
        "end:finetune",
    ]
    assert summary["steps"] == 4 + 7  # half an epoch (ceil of 3.5), then one epoch
    stages = [
        json.loads(x)["stage"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    assert stages[0] == "warmup" and stages[-1] == "finetune"


def test_run_dir_of_another_run_is_refused(tiny_data, tmp_path):
    train_run(_config(tiny_data, max_steps=1), tmp_path / "r")
    other = _config(tiny_data, max_steps=1)
    other.dim = 16
    with pytest.raises(RunError, match="holds a different run"):
        train_run(other, tmp_path / "r")


def test_training_is_deterministic_by_seed(tiny_data, tmp_path):
    a = train_run(_config(tiny_data, seed=1), tmp_path / "a")
    b = train_run(_config(tiny_data, seed=1), tmp_path / "b")
    c = train_run(_config(tiny_data, seed=2), tmp_path / "c")
    assert a["test_logloss"] == b["test_logloss"] != c["test_logloss"]
