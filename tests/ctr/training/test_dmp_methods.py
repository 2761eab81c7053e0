"""The search, pruning and dimension methods train under torchrun (2 gloo processes) and
end where one process ends: the same kept entries, rows and dims, and test AUC within 0.005
and the same weights up to fp32 summation order (the averaged gradients are the global
batch's)."""

import json
import os
import subprocess
from pathlib import Path

import torch

from ctr.training.run import train_run
from tests.helpers.dmp_methods import METHODS, run_config
from tests.helpers.torchrun import torchrun_command

ROOT = Path(__file__).resolve().parents[3]


def test_data_parallel_methods_match_one_process(tiny_data, tmp_path):
    methods = list(METHODS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = torchrun_command(
        str(ROOT / "tests" / "helpers" / "dmp_methods.py"),
        str(tiny_data),
        str(tmp_path / "dmp"),
        *methods,
    )
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for method in methods:
        single = train_run(run_config(str(tiny_data), method), tmp_path / "one" / method)
        sharded = json.loads((tmp_path / "dmp" / method / "summary.json").read_text())
        assert (single["world_size"], sharded["world_size"]) == (1, 2)
        assert single["steps"] == sharded["steps"], method
        # What the method kept (masks' entries and rows, searched dims, thresholds, α's
        # bounds) is reported in its hyperparameters and serve bytes.
        assert sharded["hyperparameters"] == single["hyperparameters"], method
        assert sharded["serve_bytes"] == single["serve_bytes"], method
        assert abs(sharded["test_auc"] - single["test_auc"]) < 0.005, (
            method,
            single["test_auc"],
            sharded["test_auc"],
        )
        # The weights themselves (masks exactly): a rank training on its share alone, or
        # statistics of a share, are far beyond fp32 summation-order noise (~1e-7).
        a = torch.load(tmp_path / "one" / method / "model.pt", weights_only=True)
        b = torch.load(tmp_path / "dmp" / method / "model.pt", weights_only=True)
        assert a.keys() == b.keys(), method
        for key, value in a.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point():
                assert torch.allclose(value, b[key], rtol=1e-4, atol=1e-5), (method, key)
            else:
                assert torch.equal(value, b[key]), (method, key)
