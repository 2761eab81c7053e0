"""The trainer's side of the stage contract, on toy compressors defined here: rewinds, bilevel
alternation, frozen dense networks, resumable searches and shape-changing (rebuild) stages."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from compressors.baseline.full import Full
from compressors.core.base import Stage
from compressors.core.layout import Combiner
from compressors.core.registry import COMPRESSORS
from compressors.core.storage import TrainTables
from ctr.training.run import RunConfig, load_run_model, train_run
from ctr.training.trainer import TrainConfig, Trainer
from datasets.loader import BatchLoader

PREFIX = "embedding.compressor."


def _config(data, name, **train):
    defaults = dict(epochs=1, batch_size=512, progress=False, eval_every=3, seed=3)
    return RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [8]},
        dim=8,
        compressor=name,
        train=TrainConfig(**{**defaults, **train}),
    )


def _register(monkeypatch, cls):
    monkeypatch.setitem(COMPRESSORS, cls.name, cls)


def _weights(run):
    state = torch.load(run / "model.pt", weights_only=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- rewind
class _Rewinding(Full):
    """Trains, sets a mask, then retrains from the initial weights keeping the mask."""

    name = "test_rewinding"
    stages = (Stage("train", epochs=0.5), Stage("retrain", epochs=0.5, rewind=True))
    seen: dict = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.zeros(3))

    def rewind_keep(self):
        return ["mask"]

    def on_stage_end(self, stage, ctx):
        if stage.name == "train":
            self.mask.fill_(7.0)

    def on_stage_start(self, stage, ctx):
        if stage.name == "retrain" and not ctx.resumed:
            trainer = ctx.trainer
            _Rewinding.seen = {
                "state": {k: v.clone() for k, v in ctx.model.state_dict().items()},
                "initial": ctx.initial_state(),
                "table_state": [  # views of live state: copy them
                    t.clone()
                    for o in trainer.table_optimizers.values()
                    for t in _leaves(o.state_dict()["state"])
                ],
                "dense_state": trainer.optimizers["dense"].state_dict()["state"],
            }


def _leaves(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)


def test_rewind_restores_initial_weights_but_kept_entries_and_resets_optimizers(
    tiny_data, tmp_path, monkeypatch
):
    _register(monkeypatch, _Rewinding)
    train_run(_config(tiny_data, _Rewinding.name), tmp_path / "r")
    seen = _Rewinding.seen
    initial, state = seen["initial"], seen["state"]
    assert (tmp_path / "r" / "initial.pt").exists()
    on_disk = torch.load(tmp_path / "r" / "initial.pt", weights_only=True)
    # The file is whole and the trainer maps it (no copy of every table in memory); the
    # kept entries the rewind reads from the model.
    assert torch.equal(on_disk[PREFIX + "mask"], torch.zeros(3))
    _assert_same(on_disk, initial)
    assert torch.equal(state[PREFIX + "mask"], torch.full((3,), 7.0))  # kept
    for k, v in initial.items():
        if k != PREFIX + "mask":
            assert torch.equal(state[k], v), k  # tables and network back at step 0
    final = _weights(tmp_path / "r")
    table = next(k for k in final if k.startswith(PREFIX + "tables."))
    assert not torch.equal(final[table], initial[table])  # and retrained from there
    leaves = seen["table_state"]
    assert leaves and all(t.abs().sum() == 0 for t in leaves)  # rowwise Adagrad state zeroed
    assert seen["dense_state"] == {}  # a fresh Adam


# ---------------------------------------------------------------- bilevel
class _Bilevel(Full):
    """Architecture weights alpha scale each field; they learn only on validation batches."""

    name = "test_bilevel"
    stages = (Stage("search", epochs=1.0, bilevel=True),)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = nn.Parameter(torch.ones(self.num_features))

    def forward(self, features):
        return super().forward(features) * self.alpha[None, :, None]

    def penalty(self):
        return 1e-3 * self.alpha.abs().sum()

    def optimizer_groups(self):
        return [{"params": [self.alpha], "optimizer": "sgd", "lr": 0.5, "role": "valid"}]


def _tables(trainer):
    return {k: v.clone() for k, v in trainer.model.embedding.compressor.tables.weights().items()}


def test_bilevel_steps_update_only_valid_groups_on_validation_batches(
    tiny_data, tmp_path, monkeypatch
):
    _register(monkeypatch, _Bilevel)
    calls = {"train": 0, "valid": 0}
    sizes: set[int] = set()
    firsts: list[torch.Tensor] = []
    train_step, valid_step = Trainer.train_step, Trainer.valid_step

    def checked_train(self, batch, dense=True):
        alpha = self.compressor.alpha.detach().clone()
        out = train_step(self, batch, dense)
        assert torch.equal(self.compressor.alpha, alpha)  # alpha waits for validation
        calls["train"] += 1
        return out

    def checked_valid(self, batch):
        tables = _tables(self)
        network = {k: v.clone() for k, v in self.model.named_parameters() if "compressor" not in k}
        alpha = self.compressor.alpha.detach().clone()
        out = valid_step(self, batch)
        for k, v in _tables(self).items():
            assert torch.equal(v, tables[k]), k  # fused tables never move on validation
        for k, v in self.model.named_parameters():
            if k in network:
                assert torch.equal(v, network[k]), k
        assert not torch.equal(self.compressor.alpha, alpha)
        calls["valid"] += 1
        # Drawn like a training batch (its size, shuffled), not the evaluation loader's.
        sizes.add(len(batch.labels))
        firsts.append(batch.sparse_features.values()[:32].clone())
        return out

    monkeypatch.setattr(Trainer, "train_step", checked_train)
    monkeypatch.setattr(Trainer, "valid_step", checked_valid)
    config = _config(tiny_data, _Bilevel.name, restore_best=False, batch_size=128, patience=99)
    train_run(config, tmp_path / "r")
    assert calls["train"] == calls["valid"] == 31  # one epoch of 4000 // 128, alternating
    assert sizes == {128}
    ordered = next(iter(BatchLoader(tiny_data, "valid", 128)))
    assert not torch.equal(firsts[0], ordered.sparse_features.values()[:32])  # shuffled


def test_bilevel_steps_can_draw_from_a_held_out_share_of_training_rows(
    tiny_data, tmp_path, monkeypatch
):
    # search_holdout: the architecture steps read training rows no stage trains on, and the
    # validation split stays unseen by every parameter.
    class _HeldOut(_Bilevel):
        name = "test_bilevel_holdout"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.hold_out(0.25)

    _register(monkeypatch, _HeldOut)
    streams = set()
    valid_step = Trainer.valid_step

    def record(self, batch):
        streams.add((self.search.split, self.search.row_share, self.train.row_share))
        return valid_step(self, batch)

    monkeypatch.setattr(Trainer, "valid_step", record)
    train_run(_config(tiny_data, _HeldOut.name, batch_size=128, patience=99), tmp_path / "r")
    # Disjoint shares of the training split (tests/datasets/test_loader.py checks that they are).
    assert streams == {("train", (0.75, 1.0), (0.0, 0.75))}


def test_bilevel_resume_continues_the_alternation_exactly(tiny_data, tmp_path, monkeypatch):
    _register(monkeypatch, _Bilevel)
    train_run(_config(tiny_data, _Bilevel.name), tmp_path / "whole")
    first = train_run(_config(tiny_data, _Bilevel.name, max_steps=4), tmp_path / "split")
    assert first == {"finished": False, "steps": 4}
    train_run(_config(tiny_data, _Bilevel.name), tmp_path / "split")
    _assert_same(_weights(tmp_path / "whole"), _weights(tmp_path / "split"))


# ---------------------------------------------------------------- dense=False
class _TablesOnly(Full):
    name = "test_tables_only"
    stages = (Stage("tables", epochs=0.5, dense=False),)


def test_frozen_dense_stage_leaves_the_network_unchanged(tiny_data, tmp_path, monkeypatch):
    _register(monkeypatch, _TablesOnly)
    train_run(_config(tiny_data, _TablesOnly.name), tmp_path / "r")
    before = _fresh_model(tiny_data, _TablesOnly.name).state_dict()
    after = _weights(tmp_path / "r")
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert moved and all(k.startswith(PREFIX + "tables.") for k in moved), moved


def _fresh_model(data, name):
    from ctr.training.run import build_run_model

    return build_run_model(_config(data, name))


# ---------------------------------------------------------------- resumable search
class _Search(Full):
    """A search that checkpoints after every generation; ``kill_at`` raises mid-way."""

    name = "test_search"
    stages = (Stage("train", epochs=0.3), Stage("search", trains=False), Stage("tune", epochs=0.3))
    generations = 5
    kill_at: int | None = None
    resumed_with: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("found", torch.zeros(self.generations))

    def on_stage_start(self, stage, ctx):
        if stage.name == "search":
            _Search.resumed_with.append(ctx.resumed)

    def run_stage(self, stage, ctx):
        restored = ctx.restored_state()
        rng = ctx.rng()
        start = 0
        if restored is not None:
            start = restored["generation"]
            rng.set_state(restored["rng"])
            self.found.copy_(restored["found"])
        for gen in range(start, self.generations):
            score = ctx.evaluate("valid", max_batches=1)["logloss"]
            self.found[gen] = score + torch.rand((), generator=rng).item()
            ctx.checkpoint(
                {"generation": gen + 1, "rng": rng.get_state(), "found": self.found.clone()}
            )
            if _Search.kill_at == gen:
                _Search.kill_at = None
                raise KeyboardInterrupt("killed")


def test_killed_search_resumes_from_its_checkpoint(tiny_data, tmp_path, monkeypatch):
    _register(monkeypatch, _Search)
    _Search.resumed_with = []
    train_run(_config(tiny_data, _Search.name), tmp_path / "whole")
    assert _Search.resumed_with == [False]
    _Search.resumed_with, _Search.kill_at = [], 2
    with pytest.raises(KeyboardInterrupt):
        train_run(_config(tiny_data, _Search.name), tmp_path / "split")
    train_run(_config(tiny_data, _Search.name), tmp_path / "split")
    assert _Search.resumed_with == [False, True]
    whole, split = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert whole[PREFIX + "found"].count_nonzero() == _Search.generations
    _assert_same(whole, split)


# ---------------------------------------------------------------- rebuild
class _Shrinking(Full):
    """Halves every table's dim in a rebuilding stage (the combiner zero-pads back to dim)."""

    name = "test_shrinking"
    stages = (
        Stage("train", epochs=0.5),
        Stage("shrink", trains=False, rebuilds=True),
        Stage("tune", epochs=1.0),
    )

    def run_stage(self, stage, ctx):
        pass  # a search would run here; shapes change in on_stage_end

    def on_stage_end(self, stage, ctx):
        if stage.rebuilds:
            self._reshape(self.dim // 2, keep_weights=True)

    def architecture(self):
        dims = {t.dim for t in self.layout.tables}
        return None if dims == {self.dim} else {"table_dim": dims.pop()}

    def rebuild(self, architecture):
        self._reshape(architecture["table_dim"], keep_weights=False)

    def _reshape(self, dim, keep_weights):
        old = self.tables.weights()
        tables = [replace(t, dim=dim) for t in self.layout.tables]
        new = TrainTables(tables, self.layout.lookups)
        if keep_weights:
            with torch.no_grad():
                for name, w in new.weights().items():
                    w.copy_(old[name][:, :dim])
        self.layout.tables = tables
        self.tables = new
        self.combiner = Combiner(
            self.layout.lookups, [dim] * len(tables), self.num_features, self.dim
        )


def test_rebuilding_stage_trains_on_saves_its_record_and_reloads(tiny_data, tmp_path, monkeypatch):
    _register(monkeypatch, _Shrinking)
    summary = train_run(_config(tiny_data, _Shrinking.name), tmp_path / "whole")
    assert summary["serve_bytes"] == summary["full_bytes"] // 2
    state = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert "__architecture__" in state
    model, _ = load_run_model(tmp_path / "whole")
    assert model.embedding.compressor.layout.tables[0].dim == 4
    weights = _weights(tmp_path / "whole")
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    # killed after the rebuild, mid-way through the last stage: resumes exactly
    first = train_run(_config(tiny_data, _Shrinking.name, max_steps=6), tmp_path / "split")
    assert first == {"finished": False, "steps": 6}
    train_run(_config(tiny_data, _Shrinking.name), tmp_path / "split")
    _assert_same(weights, _weights(tmp_path / "split"))


class _ShrinkThenRewind(_Shrinking):
    """Shrinks, then retrains from the step-0 weights cut to the new shapes."""

    name = "test_shrink_then_rewind"
    stages = (
        Stage("train", epochs=0.5),
        Stage("shrink", trains=False, rebuilds=True),
        Stage("retrain", epochs=0.5, rewind=True),
    )
    at_retrain: dict = {}

    def rewind_state(self, initial):
        dim = self.layout.tables[0].dim
        return {k: v[:, :dim] if ".embedding_bags." in k else v for k, v in initial.items()}

    def on_stage_start(self, stage, ctx):
        if stage.rewind:
            _ShrinkThenRewind.at_retrain = {
                "now": self.tables.weights()[self.layout.tables[0].name].detach().clone(),
                "initial": ctx.initial_state(),
            }


def test_rewind_after_a_rebuild_uses_the_compressors_mapping(tiny_data, tmp_path, monkeypatch):
    _register(monkeypatch, _ShrinkThenRewind)
    train_run(_config(tiny_data, _ShrinkThenRewind.name), tmp_path / "r")
    seen = _ShrinkThenRewind.at_retrain
    name = next(k for k in seen["initial"] if ".embedding_bags." in k)
    assert torch.equal(seen["now"], seen["initial"][name][:, :4])
