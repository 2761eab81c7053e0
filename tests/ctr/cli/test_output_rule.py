"""One output rule for every command: ours or empty, never the cwd or a parent, replaced only
with ``--overwrite``, built beside and renamed; a failure leaves the previous output whole."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from ctr.cli import main

QUIET = "--no-progress"


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _csv(path: Path, rows: int = 400, label: str = "clicked", bad_labels: bool = False) -> Path:
    lines = [f"{label},site,price"]
    for i in range(rows):
        y = "maybe" if bad_labels else str(i % 3 == 0 and 1 or 0)
        lines.append(f"{y},s{i % 7},{i % 11}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _prepare(csv: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "prepare",
            "table",
            str(csv),
            "--out",
            str(out),
            "--label",
            "clicked",
            "--categorical",
            "site",
            "--numeric",
            "price",
            QUIET,
            *extra,
        ]
    )


def test_prepare_keeps_a_users_train_and_test_folders(tmp_path, capsys):
    csv = _csv(tmp_path / "logs.csv")
    proj = tmp_path / "proj"
    (proj / "train").mkdir(parents=True)
    (proj / "test").mkdir()
    (proj / "train" / "cat.jpg").write_bytes(b"img")
    (proj / "test" / "dog.jpg").write_bytes(b"img")
    before = _tree(proj)
    for extra in ([], ["--overwrite"]):
        assert _prepare(csv, proj, *extra) == 2
        assert "not empty and not a prepared dataset" in capsys.readouterr().err
        assert _tree(proj) == before
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "draft.tmp").write_text("mine")
    assert _prepare(csv, draft) == 2
    assert (draft / "draft.tmp").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_prepare_refuses_the_current_directory(tmp_path, monkeypatch, capsys):
    csv = _csv(tmp_path / "logs.csv")
    work = tmp_path / "work"
    (work / "train").mkdir(parents=True)
    (work / "train" / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        assert _prepare(csv, Path(out), "--overwrite") == 2
        assert "current directory" in capsys.readouterr().err
    assert (work / "train" / "mine.txt").read_text() == "mine"


def test_failed_prepare_overwrite_keeps_the_previous_dataset(tmp_path, capsys):
    out = tmp_path / "data"
    assert _prepare(_csv(tmp_path / "good.csv"), out) == 0
    before = _tree(out)
    assert _prepare(_csv(tmp_path / "good.csv"), out) == 2  # ours, but no --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    bad = _csv(tmp_path / "bad.csv", bad_labels=True)
    assert _prepare(bad, out, "--overwrite", "--max-dropped-fraction", "1") == 2
    assert "no usable train rows" in capsys.readouterr().err
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "data", "good.csv"]
    assert _prepare(_csv(tmp_path / "good.csv", rows=500), out, "--overwrite") == 0
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["rows"] > 0


SYNTH = ["synth", "--rows", "3000", "--scale", "0.0003", "--no-progress"]
TRAIN = ["train", "--dim", "4", "--batch-size", "512", "--model-opt", "hidden=[8]", QUIET]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(dataset, finished run, artifact)."""
    root = tmp_path_factory.mktemp("rule")
    data, run, art = root / "data", root / "run", root / "art"
    assert main([*SYNTH, "--out", str(data)]) == 0
    assert main([*TRAIN, "--data", str(data), "--out", str(run)]) == 0
    assert main(["export", str(run), "--out", str(art)]) == 0
    return data, run, art


def test_train_keeps_a_users_model_and_summary(finished, tmp_path, monkeypatch, capsys):
    data = finished[0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.pt").write_bytes(b"my weights")
    (mine / "summary.json").write_text('{"mine": true}')
    before = _tree(mine)
    for extra in ([], ["--overwrite"]):
        assert main([*TRAIN, "--data", str(data), "--out", str(mine), *extra]) == 2
        assert "not empty and not a run" in capsys.readouterr().err
        assert _tree(mine) == before
    monkeypatch.chdir(mine)
    for out in (".", ".."):
        assert main([*TRAIN, "--data", str(data), "--out", out, "--overwrite"]) == 2
        assert "current directory" in capsys.readouterr().err
    assert _tree(mine) == before


def test_train_replaces_a_different_run_only_with_overwrite(finished, tmp_path, capsys):
    data = finished[0]
    run = tmp_path / "run"
    assert main([*TRAIN, "--data", str(data), "--out", str(run)]) == 0
    before = _tree(run)
    other = [*TRAIN, "--data", str(data), "--out", str(run), "--seed", "1"]
    assert main(other) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _tree(run) == before
    assert main([*other, "--overwrite"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left aside


def test_refused_train_leaves_nothing_and_the_corrected_command_runs(finished, tmp_path, capsys):
    data = finished[0]
    run = tmp_path / "run"
    base = [*TRAIN, "--data", str(data), "--out", str(run)]
    assert main([*base, "--compressor", "hash", "--budget", "1000000x"]) == 2
    assert main([*base, "--compressor", "hash", "--method-opt", "nonsense=1"]) == 2
    capsys.readouterr()
    assert not run.exists()
    assert main([*base, "--compressor", "hash", "--budget", "4x"]) == 0


def test_export_of_a_run_that_never_trained_does_not_say_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(tmp_path / "data")}))
    assert main(["export", str(run), "--out", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "never trained" in err and "resume" not in err


def test_predict_keeps_a_users_tmp_file(finished, tmp_path, capsys):
    data, _, art = finished
    out = tmp_path / "q.csv"
    mine = tmp_path / ".q.csv.tmp"
    mine.write_text("my draft")
    assert main(["predict", str(art), "--data", str(data), "--out", str(out)]) == 0
    assert mine.read_text() == "my draft"
    assert out.read_text().startswith("prob,label\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.csv.tmp", "q.csv"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)


def test_predict_to_a_pipe_returns_at_once(finished, tmp_path, capsys):
    data, _, art = finished
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    codes: list[int] = []
    argv = ["predict", str(art), "--data", str(data), "--out", str(fifo)]
    worker = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    worker.start()
    worker.join(5)
    assert codes == [2], "ctr predict --out <a pipe> did not return within 5 s"
    assert "not a regular file" in capsys.readouterr().err


def test_every_command_refuses_the_current_directory(finished, tmp_path, monkeypatch, capsys):
    data, run, art = finished
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    commands = {
        "synth": [*SYNTH, "--overwrite"],
        "train": [*TRAIN, "--data", str(data), "--overwrite"],
        "export": ["export", str(run), "--overwrite"],
        "demo": ["demo", "--rows", "1000", "--overwrite"],
        "sweep run": ["sweep", "run", "--data", str(data), "--methods", "full", "--budgets", "1x"],
        "sweep report": ["sweep", "report", str(tmp_path), "--overwrite"],
    }
    for name, argv in commands.items():
        for out in (".", ".."):
            try:
                code = main([*argv, "--out", out])
            except SystemExit as e:
                code = e.code
            assert code not in (0, None), (name, out)
            assert "current directory" in capsys.readouterr().err, (name, out)
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]
