"""The `ctr` command line, in process (and one real console-script call)."""

import json
import shutil
import subprocess
import sys

import pytest

from ctr.cli import build_parser, main

COMMANDS = ["synth", "train", "export", "predict", "demo", "methods"]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "methods"])
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_synth_train_export_predict(tmp_path, capsys):
    data, run, art = tmp_path / "data", tmp_path / "run", tmp_path / "art"
    assert (
        main(["synth", "--rows", "6000", "--scale", "0.0005", "--out", str(data), "--no-progress"])
        == 0
    )
    assert "teacher test AUC" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--model",
                "deepfm",
                "--compressor",
                "full",
                "--budget",
                "1x",
                "--dim",
                "8",
                "--epochs",
                "1",
                "--batch-size",
                "1024",
                "--model-opt",
                "hidden=[16]",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "test AUC" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "deepfm" and summary["ratio"] == pytest.approx(1.0)
    assert main(["export", str(run), "--out", str(art), "--storage", "int8"]) == 0
    assert "smaller than fp32" in capsys.readouterr().out
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(art), "--data", str(data), "--out", str(preds)]) == 0
    out = capsys.readouterr().out
    assert "AUC" in out
    lines = preds.read_text().splitlines()
    assert lines[0] == "prob,label" and len(lines) == 601
    assert all(0 < float(x.split(",")[0]) < 1 for x in lines[1:])


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no meta.json" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_bad_budget_is_a_clear_error(tiny_data, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(tiny_data),
            "--budget",
            "10x",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "full: the solved layout at fp32 needs" in capsys.readouterr().err


def test_methods_lists_full_with_options(capsys):
    assert main(["methods"]) == 0
    assert "shared=False" in capsys.readouterr().out


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("ctr") or str(__import__("pathlib").Path(sys.executable).parent / "ctr")
    result = subprocess.run([exe, "methods"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "full" in result.stdout


@pytest.mark.parametrize(
    ("flags", "optimizer", "lr"),
    [
        (["--compressor", "hash"], "rowwise_adagrad", 0.05),
        (["--compressor", "pep"], "adam", 1e-3),
        (["--compressor", "dnis"], "adam", 1e-3),
        (["--compressor", "pep", "--table-optimizer", "rowwise_adagrad"], "rowwise_adagrad", 0.05),
        (["--compressor", "hash", "--table-optimizer", "adam", "--table-lr", "0.01"], "adam", 0.01),
    ],
)
def test_train_defaults_to_each_methods_optimizer(tiny_data, flags, optimizer, lr, capsys):
    from ctr.cli.train import _run_config

    args = build_parser().parse_args(
        ["train", "--data", str(tiny_data), "--out", "x", "--batch-size", "64", *flags]
    )
    train = _run_config(args).train
    assert (train.table_optimizer, train.table_lr) == (optimizer, lr)
