"""A run that diverges says so: non-finite rates are refused, a NaN loss stops the run at its
step naming the flags, a loss far above chance is reported once."""

from __future__ import annotations

from pathlib import Path

from ctr.cli import main


def _train(data: Path, out: Path, *extra: str) -> int:
    argv = ["train", "--data", str(data), "--out", str(out), "--dim", "4", "--batch-size", "64"]
    return main([*argv, "--model-opt", "hidden=[8]", "--no-progress", *extra])


def test_infinite_rates_are_refused_before_training(tiny_data, tmp_path, capsys):
    for flag in ("--lr", "--table-lr"):
        assert _train(tiny_data, tmp_path / "r", flag, "inf") == 2
        assert f"{flag} must be a positive finite number, got inf" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_nan_loss_stops_the_run_at_its_step(tiny_data, tmp_path, capsys):
    run = tmp_path / "r"
    assert _train(tiny_data, run, "--lr", "1e30", "--table-lr", "1e38") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the training loss became nan at step ")
    assert "--lr (1e+30)" in err and "--table-lr (1e+38)" in err
    assert not (run / "model.pt").exists() and not (run / "summary.json").exists()


def test_a_diverging_loss_is_reported_once(tiny_data, tmp_path, capsys):
    assert _train(tiny_data, tmp_path / "r", "--lr", "1e6", "--table-lr", "1e6") in (0, 2)
    err = capsys.readouterr().err
    assert err.count("the run is diverging") + err.count("the run diverged") == 1, err
