"""The newcomer's path: refusals before work, errors that name the file or flag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctr.cli import main
from datasets.prepared import DatasetMeta
from datasets.synthetic import SyntheticConfig, generate_synthetic

CONFIG = SyntheticConfig(rows=3_000, cardinalities=(30, 200, 50), num_dense=2)
TRAIN = ["--dim", "4", "--batch-size", "512", "--model-opt", "hidden=[8]", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("newcomer") / "data"
    generate_synthetic(out, CONFIG, progress=False)
    return out


def _train(data: Path, run: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(run), *TRAIN, *extra])


def test_help_and_synth_import_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from ctr.cli import build_parser, main\n"
        "build_parser(commands=()).format_help()\n"
        f"assert main(['synth', '--rows', '2000', '--scale', '0.0002', '--no-progress', "
        f"'--out', {str(tmp_path / 'd')!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd()
    )
    assert child.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--epochs", "0", "--epochs must be a positive number (fractions allowed), got 0.0"),
        ("--epochs", "-1", "--epochs must be a positive number (fractions allowed), got -1.0"),
        ("--dim", "0", "--dim must be a positive integer, got 0"),
        ("--batch-size", "0", "--batch-size must be a positive integer, got 0"),
    ],
)
def test_impossible_settings_are_refused_before_anything(
    data, tmp_path, capsys, flag, value, message
):
    assert _train(data, tmp_path / "run", flag, value) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_few_steps_per_epoch_warn_with_a_suggestion(data, tmp_path, capsys):
    assert _train(data, tmp_path / "run", "--max-steps", "1") == 0
    err = capsys.readouterr().err
    assert "warning: an epoch of 2,400 train rows is only 4 steps at --batch-size 512" in err
    assert "try --batch-size 8" in err


def test_missing_shard_is_found_before_training(data, tmp_path, capsys):
    copy = tmp_path / "data"
    generate_synthetic(copy, CONFIG, progress=False)
    shard = DatasetMeta.load(copy).files("test")[0]
    shard.unlink()
    assert _train(copy, tmp_path / "run") == 2
    assert capsys.readouterr().err == (
        f"error: {shard}: missing shard of split 'test' (1 of 1 missing); re-prepare the dataset\n"
    )
    assert not (tmp_path / "run").exists()


def test_damaged_run_files_are_named(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(data, run, "--max-steps", "2") == 0
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    capsys.readouterr()
    assert _train(data, run, "--max-steps", "3") == 2
    err = capsys.readouterr().err.splitlines()  # the few-steps warning, then the error
    assert err[-1].startswith(f"error: {checkpoint}: unreadable checkpoint file")
    assert err[-2].startswith("warning: ")

    checkpoint.unlink()
    assert _train(data, run) == 0
    capsys.readouterr()
    model = run / "model.pt"
    model.write_bytes(model.read_bytes()[:500])
    assert main(["export", str(run), "--out", str(tmp_path / "art")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {model}: unreadable model weights file")

    (run / "config.json").write_text('{"data": ')
    assert main(["export", str(run), "--out", str(tmp_path / "art")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {run / 'config.json'}: invalid JSON at line 1"
    )
    assert not (tmp_path / "art").exists()


def test_dense_count_mismatch_at_predict_names_both(data, tmp_path, capsys):
    run, art = tmp_path / "run", tmp_path / "art"
    assert _train(data, run, "--epochs", "0.1") == 0
    assert main(["export", str(run), "--out", str(art)]) == 0
    other = tmp_path / "other"
    generate_synthetic(
        other, SyntheticConfig(**{**CONFIG.__dict__, "num_dense": 3}), progress=False
    )
    capsys.readouterr()
    assert main(["predict", str(art), "--data", str(other)]) == 2
    assert capsys.readouterr().err == (
        f"error: {other} has 3 dense features, the artifact {art} expects 2\n"
    )
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 0.1
