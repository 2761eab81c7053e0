"""``--device``: auto picks CUDA when present, else the CPU; a CUDA device that is not there,
or a malformed name, is a one-line error naming the flag; a run may resume on another device."""

from __future__ import annotations

import pytest
import torch

from ctr.training.config import TrainConfig
from ctr.training.device import resolve_device
from ctr.training.run import _resume_relevant
from tests.helpers.pruning_checks import config


def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CTR_DEVICE", raising=False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)  # what auto picks on a GPU
    monkeypatch.setenv("CTR_DEVICE", "cpu")  # ... unless the environment says otherwise
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("CTR_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"CTR_DEVICE \(what --device auto means\): expected"):
        resolve_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CTR_DEVICE")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda: torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"--device cuda:1: torch sees no CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_a_malformed_device_names_the_flag(name):
    with pytest.raises(ValueError, match=r"--device: expected auto, cpu, cuda or cuda:N"):
        TrainConfig(device=name).validate()


def test_the_device_is_not_part_of_a_runs_identity():
    a, b = TrainConfig(device="cpu"), TrainConfig(device="cuda")
    assert _resume_relevant(vars(a)) == _resume_relevant(vars(b))
    assert TrainConfig().device == "auto"


def test_the_cli_flag_reaches_the_config(tiny_data):
    from ctr.cli.main import build_parser
    from ctr.cli.train import _run_config

    argv = ["train", "--data", str(tiny_data), "--out", "r", "--device", "cpu"]
    args = build_parser(["train"]).parse_args(argv)
    args.batch_size = 256
    assert _run_config(args).train.device == "cpu"


# optembed's search stage builds its candidates' tensors on the host: not yet device-clean
# (bench.py --only gpu_smoke reports every method).
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["full", "hash", "pep", "deeplight"])
def test_training_on_cuda_matches_the_cpu_start(method, tiny_data, tmp_path):
    # The same run on both devices: CUDA kernels differ in rounding, not in what they learn.
    from ctr.training.run import load_run_model, train_run

    aucs = {}
    for device in ("cpu", "cuda"):
        cfg = config(tiny_data, method, "1x" if method == "full" else "4x", epochs=0.1)
        cfg.train.device = device
        aucs[device] = train_run(cfg, tmp_path / device)["test_auc"]
        model, _ = load_run_model(tmp_path / device)
        assert next(model.parameters()).device.type == "cpu"  # checkpoints load on the host
    assert abs(aucs["cpu"] - aucs["cuda"]) < 0.02, aucs


@pytest.mark.cuda
def test_batches_are_page_locked_for_a_cuda_run(tiny_data):
    from ctr.training.run import build_run_model
    from ctr.training.trainer import Trainer
    from datasets.loader import BatchLoader
    from datasets.prepared import DatasetMeta

    cfg = config(tiny_data, "full", "1x").resolved()
    cfg.train.device = "cuda"
    model = build_run_model(cfg, DatasetMeta.load(tiny_data))
    loader = BatchLoader(tiny_data, "train", 256)
    trainer = Trainer(model, loader, BatchLoader(tiny_data, "valid", 256), cfg.train)
    batch = next(iter(trainer.train))
    assert batch.dense_features.is_pinned() and batch.sparse_features.values().is_pinned()
    assert not next(iter(loader)).dense_features.is_pinned()  # the caller's loader unchanged
    assert trainer.placement.to_device(batch).labels.device.type == "cuda"
