"""What the trainer does around a stage's ``early_stop`` and ``restore_best`` flags, on toy
compressors whose validation AUC is made to fall: a scheduled (search or pruning) stage runs to
its last step at its learning rate, and restoring a stage's best weights never rolls back the
compressor's architecture state."""

import math

import torch

from compressors.baseline.full import Full
from compressors.core.base import SCHEDULED, Stage
from compressors.core.registry import COMPRESSORS
from ctr.training.run import RunConfig, train_run
from ctr.training.trainer import TrainConfig

PREFIX = "embedding.compressor."


def _config(data, name, **train):
    defaults = dict(
        epochs=1,
        batch_size=128,
        progress=False,
        eval_every=4,
        seed=3,
        patience=1,
        lr_decay=0.5,
    )
    return RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [8]},
        dim=8,
        compressor=name,
        train=TrainConfig(**{**defaults, **train}),
    )


def _wreck(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Noise on the dense network: validation AUC falls towards chance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "compressor" not in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)


class _Toy(Full):
    """A 'prune' stage then a 'tune' stage; ``arch`` counts steps (architecture state) and the
    network is wrecked after every step of the stages named in ``wreck``."""

    name = "test_stage_flags"
    stages = (Stage("prune", epochs=1.0, **SCHEDULED), Stage("tune", epochs=1.0))
    wreck: tuple[str, ...] = ("prune",)
    seen: dict = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("arch", torch.zeros((), dtype=torch.int64))
        self.generator = torch.Generator().manual_seed(0)

    def architecture_state(self):
        return ["arch"]

    def on_stage_start(self, stage, ctx):
        _Toy.seen.setdefault("steps", {})[stage.name] = 0
        _Toy.seen.setdefault("lrs", {})[stage.name] = []

    def after_step(self, ctx):
        self.arch += 1
        _Toy.seen["steps"][ctx.stage.name] += 1
        _Toy.seen["lrs"][ctx.stage.name].append(ctx.table_lr)
        if ctx.stage.name in self.wreck:
            _wreck(ctx.model, self.generator)
        _Toy.seen["last_net"] = {
            k: v.detach().clone() for k, v in ctx.model.named_parameters() if "compressor" not in k
        }

    def on_stage_end(self, stage, ctx):
        _Toy.seen.setdefault("arch_at_end", {})[stage.name] = int(self.arch)


def _run(tiny_data, tmp_path, monkeypatch, wreck, **train):
    monkeypatch.setitem(COMPRESSORS, _Toy.name, _Toy)
    monkeypatch.setattr(_Toy, "wreck", wreck)
    _Toy.seen = {}
    summary = train_run(_config(tiny_data, _Toy.name, **train), tmp_path / "r")
    steps_per_epoch = math.ceil(summary["steps"] / 2)
    return summary, steps_per_epoch


def test_scheduled_stage_runs_every_step_at_its_lr_and_keeps_its_last_weights(
    tiny_data, tmp_path, monkeypatch
):
    # "tune" runs its whole epoch too: the yardstick of a stage's full length.
    stages = (Stage("prune", epochs=1.0, **SCHEDULED), Stage("tune", epochs=1.0, early_stop=False))
    monkeypatch.setattr(_Toy, "stages", stages)
    summary, _ = _run(tiny_data, tmp_path, monkeypatch, wreck=("prune",))
    seen = _Toy.seen
    # The validation AUC fell at every evaluation, patience 1: yet the whole schedule ran.
    assert seen["steps"]["prune"] == seen["steps"]["tune"]
    assert set(seen["lrs"]["prune"]) == {0.05}  # no plateau decay inside a schedule
    assert seen["arch_at_end"]["prune"] == seen["steps"]["prune"]
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["state"]
    prune = [h for h in state["history"] if h["stage"] == "prune"]
    assert len(prune) >= 3
    assert set(summary["stage_seconds"]) == {"prune", "tune"}


def test_early_stopping_stage_decays_lr_and_restores_weights_but_not_architecture(
    tiny_data, tmp_path, monkeypatch
):
    _run(tiny_data, tmp_path, monkeypatch, wreck=("tune",), epochs=2, patience=2)
    seen = _Toy.seen
    prune_steps, tune_steps = seen["steps"]["prune"], seen["steps"]["tune"]
    assert tune_steps < prune_steps  # stopped early: the wrecked stage's AUC fell
    lrs = seen["lrs"]["tune"]
    assert lrs[0] == 0.05 and min(lrs) < 0.05  # ctx.table_lr follows the plateau decay
    # Best weights came back, the architecture state did not go back with them.
    final = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert int(final[PREFIX + "arch"]) == prune_steps + tune_steps
    last = seen["last_net"]  # the network after the stage's last step
    assert any(not torch.equal(final[k], v) for k, v in last.items())


def test_a_new_stage_starts_at_the_base_lr(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(_Toy, "stages", (Stage("prune", epochs=1.0), Stage("tune", epochs=1.0)))
    _run(tiny_data, tmp_path, monkeypatch, wreck=("prune",), patience=50)
    lrs = _Toy.seen["lrs"]
    assert min(lrs["prune"]) < 0.05  # the early-stopping stage decayed on its plateaus
    assert lrs["tune"][0] == 0.05
