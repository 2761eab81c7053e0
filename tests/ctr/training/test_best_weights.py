"""Best and initial weights live on disk, never as a second whole copy of every table.

A run directory's ``best.pt`` / ``initial.pt`` are written straight from the model's own
tensors; without a run directory they go to a private temporary directory. Restoring maps the
file and copies from it. At millions of ids a copy of every table in memory would double what
a method needs.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from ctr.training.placement import SingleProcess
from ctr.training.run import RunConfig, build_run_model
from ctr.training.trainer import TrainConfig, Trainer
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta


def _trainer(data, run_dir=None, compressor="full", **train):
    defaults = dict(epochs=2, batch_size=512, progress=False, eval_every=1, patience=1)
    defaults.update(lr=0.5, table_lr=2.0, seed=3)  # early stopping after a dip: a restore
    cfg = RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [16]},
        dim=8,
        compressor=compressor,
        budget="1x" if compressor == "full" else "4x",
        train=TrainConfig(**{**defaults, **train}),
    ).resolved()
    meta = DatasetMeta.load(data)
    torch.manual_seed(cfg.train.seed)
    model = build_run_model(cfg, meta)
    train = BatchLoader(meta, "train", cfg.train.batch_size, shuffle=True, drop_last=True)
    valid = BatchLoader(meta, "valid", 1024)
    return Trainer(model, train, valid, cfg.train, run_dir=run_dir)


def _state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_restoring_from_disk_equals_the_best_weights_with_or_without_a_run_directory(
    tiny_data, tmp_path, monkeypatch
):
    saved = {}
    original = Trainer._save_model

    def remember(self, name):  # the best weights as the model held them when saved
        original(self, name)
        if name == "best.pt":
            saved[id(self)] = _state(self)

    monkeypatch.setattr(Trainer, "_save_model", remember)
    with_dir = _trainer(tiny_data, tmp_path / "run")
    with_dir.fit()
    without = _trainer(tiny_data)
    without.fit()
    aucs = [h["valid_auc"] for h in without.state.history]
    assert aucs[-1] < max(aucs)  # the last evaluation was not the best: a real restore
    for trainer in (with_dir, without):
        best, final = saved[id(trainer)], _state(trainer)
        assert best.keys() == final.keys()
        assert all(torch.equal(best[k], final[k]) for k in best)
    a, b = _state(with_dir), _state(without)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, wherever the file lives
    assert (tmp_path / "run" / "best.pt").exists()
    spill = without._spill
    assert spill is not None and not (spill / "best.pt").exists()  # forgotten once restored
    del without, trainer
    gc.collect()
    assert not spill.exists()  # the temporary directory goes with its trainer


@pytest.mark.parametrize("run_dir", [True, False])
def test_no_whole_copy_of_the_weights_is_made_or_kept(tiny_data, tmp_path, monkeypatch, run_dir):
    """Best weights, the checkpoint, ``model.pt`` and a rewind's initial weights are written
    from the model's own tensors: a copy of every table (``full_state``) must not be made,
    and none is held between evaluations."""

    def copy_of_every_table(self, model, net):
        raise AssertionError("a whole copy of the weights was made")

    monkeypatch.setattr(SingleProcess, "full_state", copy_of_every_table)
    trainer = _trainer(tiny_data, tmp_path / "run" if run_dir else None, "pep")
    assert any(s.rewind for s in trainer.compressor.stages)  # initial weights are saved too
    evaluate = trainer._evaluate_and_track

    def held_after_each_evaluation(stage):
        stopped = evaluate(stage)
        live = {t.untyped_storage().data_ptr() for t in trainer.model.state_dict().values()}
        for name, value in vars(trainer).items():
            if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
                own = {v.untyped_storage().data_ptr() for v in value.values()}
                assert own <= live, f"trainer.{name} holds a copy of the weights"
        return stopped

    monkeypatch.setattr(trainer, "_evaluate_and_track", held_after_each_evaluation)
    trainer.fit()
    assert trainer.state.finished


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_restoring_lets_the_mapped_files_pages_go_module_by_module(tmp_path):
    """Loading from a mapped file would otherwise leave the whole file resident (a second
    copy of every table in this process's RSS) until the load ends."""
    from ctr.training.checkpoint import _released_as_loaded, load_weights

    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(4)))  # 4 MiB each
    path = tmp_path / "best.pt"
    torch.save(model.state_dict(), path)
    target = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(4)))
    seen = []

    def resident(*_):
        seen.append(_resident_bytes(path))

    hooks = [m.register_load_state_dict_pre_hook(resident) for m in target]
    state = load_weights(path, "best weights", mmap=True)
    with _released_as_loaded(target, path):
        target.load_state_dict(state)
    resident()
    for h in hooks:
        h.remove()
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values(), strict=True)
    )
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), target.parameters(), strict=True)
    )
    assert max(seen) < 1 << 20, seen  # no module's pages still held when the next loads


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_a_table_held_as_one_tensor_is_restored_a_chunk_at_a_time(tmp_path, monkeypatch):
    """The pruning family holds its table as one tensor: one module, so the per-module
    release alone would leave it resident whole from the file."""
    from compressors.core import spill
    from ctr.training import checkpoint
    from ctr.training.checkpoint import _copy_mapped_into, load_weights

    table = torch.randn(4096, 1024)  # 16 MiB
    path = tmp_path / "best.pt"
    torch.save({"table": table, "scale": torch.ones(())}, path)
    state = load_weights(path, "best weights", mmap=True)
    ranges = checkpoint.mapped_ranges(path)
    live = {"table": torch.zeros_like(table), "scale": torch.zeros(())}
    seen = []
    release = spill.release_mapped

    def recorded(r):
        release(r)
        seen.append(_resident_bytes(path))

    monkeypatch.setattr(spill, "release_mapped", recorded)  # the chunked copy's release
    out = _copy_mapped_into(live, state, ranges, chunk_bytes=1 << 20)
    assert out["table"] is live["table"] and torch.equal(live["table"], table)
    assert out["scale"] is state["scale"]  # 0-d: left to the load
    assert len(seen) == 16 and max(seen) < 1 << 20, seen


def _resident_bytes(path):
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total
