"""scripts/package_sweep.py: which cells a package keeps, and its output rule.

Small sweep directories of cell.json/result.json written here; no training."""

import json

import pytest

from datasets.io import OutputExistsError
from scripts.package_sweep import choose_cells, collect, main


def _cell(sweep, name, method, seed, status="done", options=None, auc=0.7):
    folder = sweep / "cells" / name
    folder.mkdir(parents=True)
    cell = {"method": method, "budget": "10x", "seed": seed, "method_options": options or {}}
    result = {"method": method, "budget": "10x", "seed": seed, "status": status, "test_auc": auc}
    (folder / "cell.json").write_text(json.dumps(cell))
    (folder / "result.json").write_text(json.dumps(result))
    return folder


def test_newest_cell_of_each_key_stale_refusals_kept(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    a = _cell(new, "hash-new-0", "hash", 0)
    _cell(old, "hash-old-0", "hash", 0)  # same key, older sweep: dropped
    b = _cell(old, "hash-old-1", "hash", 1)
    c = _cell(old, "hash-opt-0", "hash", 0, options={"keep_share": 1.0})  # own key
    _cell(old, "pep-old-0", "pep", 0)  # stale in "old": dropped
    d = _cell(old, "pep-ref-1", "pep", 1, status="infeasible")  # a refusal: kept
    chosen = choose_cells([new, old], {"old": {"pep"}})
    assert sorted(chosen) == sorted([a, b, c, d])
    every = choose_cells([new, old], {"old": {"pep"}}, every_cell=True)
    assert len(every) == 5


def test_collect_copies_cell_files_and_refuses_without_overwrite(tmp_path):
    sweep = tmp_path / "sweep"
    cell = _cell(sweep, "hash-0", "hash", 0)
    (cell / "p0").mkdir()  # a trained run: not packaged
    out = tmp_path / "archive" / "s"
    collect([cell], out, overwrite=False)
    assert sorted(p.name for p in (out / "cells" / "hash-0").iterdir()) == [
        "cell.json",
        "result.json",
    ]
    with pytest.raises(OutputExistsError, match="--overwrite"):
        collect([cell], out, overwrite=False)
    collect([cell], out, overwrite=True)
    (out / "cells" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a cell collection"):
        collect([cell], out, overwrite=True)


def test_bad_arguments_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--report", str(tmp_path / "r")])
    assert "not a sweep directory" in capsys.readouterr().err
    _cell(tmp_path / "s", "hash-0", "hash", 0)
    with pytest.raises(SystemExit, match="NAME=METHOD"):
        main([str(tmp_path / "s"), "--report", str(tmp_path / "r"), "--stale", "x"])
