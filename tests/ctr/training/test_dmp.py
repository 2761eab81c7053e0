"""The same training under torchrun with TorchRec DMP (2 processes, gloo) matches one process,
and an interrupted DMP run resumes exactly."""

import json
import os
import subprocess
import sys

from tests.helpers.torchrun import torchrun_command

ARGS = [
    "train",
    "--model",
    "deepfm",
    "--model-opt",
    "hidden=[16]",
    "--dim",
    "8",
    "--epochs",
    "1",
    "--batch-size",
    "512",
    "--eval-every",
    "2",
    "--no-progress",
]


def _run(cmd, env):
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _torchrun(data, out, env, *extra):
    _run(
        torchrun_command("-m", "ctr.cli", *ARGS, "--data", str(data), "--out", str(out), *extra),
        env,
    )


def test_two_process_dmp_matches_single_process_and_resumes(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, sharded, resumed = tmp_path / "single", tmp_path / "dmp", tmp_path / "resumed"
    _run(
        [sys.executable, "-m", "ctr.cli", *ARGS, "--data", str(tiny_data), "--out", str(single)],
        env,
    )
    _torchrun(tiny_data, sharded, env)
    _torchrun(tiny_data, resumed, env, "--max-steps", "3")
    assert not (resumed / "summary.json").exists()
    _torchrun(tiny_data, resumed, env)
    a = json.loads((single / "summary.json").read_text())
    b = json.loads((sharded / "summary.json").read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["steps"] == b["steps"] == 7
    for key in ("valid_logloss", "test_logloss", "valid_auc", "test_auc"):
        assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])
    history = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    ha, hb = history(single), history(sharded)
    assert len(ha) == len(hb) >= 3
    for x, y in zip(ha, hb, strict=True):
        assert abs(x["valid_logloss"] - y["valid_logloss"]) < 1e-4
    assert (sharded / "model.pt").exists()  # gathered, unsharded weights for `ctr export`
    # An interrupted DMP run resumes exactly: same weights as the uninterrupted DMP run.
    import torch

    w_dmp = torch.load(sharded / "model.pt", weights_only=True)
    w_resumed = torch.load(resumed / "model.pt", weights_only=True)
    for k in w_dmp:
        assert torch.equal(w_dmp[k], w_resumed[k]), k
    assert history(sharded) == history(resumed)
