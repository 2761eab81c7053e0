"""No command deletes what it did not create: output directories and files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ctr.cli import main

SYNTH = ["synth", "--rows", "3000", "--scale", "0.0003", "--no-progress"]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, finished run) for export commands."""
    root = tmp_path_factory.mktemp("outputs")
    data, run = root / "data", root / "run"
    assert main([*SYNTH, "--out", str(data)]) == 0
    train = ["train", "--data", str(data), "--dim", "4", "--batch-size", "512"]
    assert main([*train, "--model-opt", "hidden=[8]", "--out", str(run), "--no-progress"]) == 0
    return data, run


def test_export_refuses_a_prepared_dataset_and_keeps_it(finished_run, tmp_path, capsys):
    data, run = finished_run
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    before = _tree(copy)
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(run), "--out", str(copy), *extra]) == 2
        assert "not empty and not a serving artifact" in capsys.readouterr().err
        assert _tree(copy) == before


def test_export_refuses_unrelated_files_and_the_current_directory(
    finished_run, tmp_path, monkeypatch, capsys
):
    _, run = finished_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert main(["export", str(run), "--out", str(mine), "--overwrite"]) == 2
    assert "holds notes.txt" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "precious"
    monkeypatch.chdir(mine)
    for out in (".", "..", str(mine)):
        assert main(["export", str(run), "--out", out, "--overwrite"]) == 2
        assert "current directory" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_export_replaces_its_own_artifact_only_with_overwrite(finished_run, tmp_path, capsys):
    _, run = finished_run
    art = tmp_path / "art"
    assert main(["export", str(run), "--out", str(art)]) == 0
    first = _tree(art)
    assert main(["export", str(run), "--out", str(art), "--storage", "fp16"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _tree(art) == first
    assert main(["export", str(run), "--out", str(art), "--storage", "fp16", "--overwrite"]) == 0
    assert _tree(art) != first
    (art / "notes.txt").write_text("mine now")  # no longer only ours: refused even so
    assert main(["export", str(run), "--out", str(art), "--overwrite"]) == 2
    assert (art / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_synth_refuses_foreign_and_replaces_its_own_with_overwrite(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.csv").write_text("1,2\n")
    assert main([*SYNTH, "--out", str(foreign), "--overwrite"]) == 2
    assert (foreign / "keep.csv").read_text() == "1,2\n"
    data = tmp_path / "data"
    assert main([*SYNTH, "--out", str(data)]) == 0
    first = _tree(data)
    assert main([*SYNTH, "--seed", "1", "--out", str(data)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _tree(data) == first
    assert main([*SYNTH, "--seed", "1", "--out", str(data), "--overwrite"]) == 0
    assert _tree(data) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "foreign"]


def test_demo_refuses_a_foreign_directory_before_doing_anything(tmp_path, capsys):
    (tmp_path / "report.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path), "--rows", "2000", "--overwrite"]) == 2
    assert "not a demo output" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]


def test_failed_predict_leaves_no_temporary_file(finished_run, tmp_path, monkeypatch, capsys):
    data, run = finished_run
    art = tmp_path / "art"
    assert main(["export", str(run), "--out", str(art)]) == 0

    def fail(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)  # the rename datasets.io.atomic_write ends with
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(art), "--data", str(data), "--out", str(preds)]) == 2
    assert "No space left" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    monkeypatch.undo()
    (tmp_path / "notes.csv").write_text("mine\n")
    assert main(["predict", str(art), "--data", str(data), "--out", str(tmp_path / "notes.csv")])
    assert "not a predictions CSV" in capsys.readouterr().err
    assert main(["predict", str(art), "--data", str(data), "--out", str(preds)]) == 0
    assert main(["predict", str(art), "--data", str(data), "--out", str(preds)]) == 2
    assert main(["predict", str(art), "--data", str(data), "--out", str(preds), "--overwrite"]) == 0
