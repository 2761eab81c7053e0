"""`ctr sweep`: a tiny sweep writes its report; resume after kill -9; infeasible budgets are
recorded; local workers and Ray give the same results as one process; defaults that learn."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from ctr.cli import main
from ctr.sweep import SweepSpec, cell_dir, cell_key, code_version, run_sweep
from ctr.sweep.report import against_full, learns_on_validation, write_report
from ctr.sweep.stats import compare, pareto_front
from ctr.training.run import auto_batch_size
from tests.helpers import ROOT

PROTOCOL = {
    "grid": [{"table_lr": 0.05, "embedding_l2": 0.0}],
    "epochs": 0.5,
    "evals_per_epoch": 2,
    "batch_size": 256,
}


def _spec(data, **overrides):
    raw = {
        "data": [str(data)],
        "methods": ["hash", "qr"],
        "budgets": ["2x", "4x"],
        "seeds": [0, 1],
        "dim": 8,
        "model_options": {"hidden": [16]},
        "reference": False,
        "protocol": PROTOCOL,
    }
    return SweepSpec.from_json({**raw, **overrides})


@pytest.fixture(scope="module")
def tiny_sweep(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    results = run_sweep(_spec(tiny_data), out, threads=1, log=lambda _: None)
    return out, results


def test_tiny_sweep_writes_table_summary_and_plot(tiny_sweep):
    out, results = tiny_sweep
    assert len(results) == 8 and all(r["status"] == "done" for r in results)
    # The code that trained each cell is recorded (a commit, when run from a checkout).
    assert {r["code_version"] for r in results} == {code_version()}
    paths = write_report(out)
    frame = pd.read_parquet(paths["parquet"])
    assert len(frame) == 8 and set(frame["method"]) == {"hash", "qr"}
    assert (frame["serve_bytes"] <= frame["full_bytes"] / 2 + 1).all()
    for column in ("test_auc", "test_logloss", "ratio", "table_lr", "samples_per_sec"):
        assert frame[column].notna().all(), column
    assert len(pd.read_csv(paths["csv"])) == 8
    summary = paths["markdown"].read_text()
    assert "| hash |" in summary and "Best per budget" in summary and " ± " in summary
    assert paths["png"][0].read_bytes()[:4] == b"\x89PNG"


def test_one_method_under_two_option_sets_reports_as_two_rows(tiny_sweep, tmp_path):
    # A second sweep directory holds the same cells plus hash cells run with an option: the
    # joint report counts the shared cells once and never averages the two option sets.
    out, _ = tiny_sweep
    other = tmp_path / "other"
    shutil.copytree(out, other)
    for cell in list((other / "cells").glob("hash-*")):
        variant = cell.with_name(cell.name + "-shared")
        shutil.copytree(cell, variant)
        config = json.loads((variant / "cell.json").read_text())
        result = json.loads((variant / "result.json").read_text())
        config["method_options"] = {"shared": True}
        result["key"] += "-shared"
        result["test_auc"] = 0.123
        (variant / "cell.json").write_text(json.dumps(config))
        (variant / "result.json").write_text(json.dumps(result))
    for cell in list((other / "cells").glob("qr-*")):
        # A twin of a qr cell written by a version whose unused lr default differed: another
        # key, the same training, counted once.
        twin = cell.with_name(cell.name + "-twin")
        shutil.copytree(cell, twin)
        config = json.loads((twin / "cell.json").read_text())
        config["protocol"]["table_lrs"] = [0.5]  # the explicit grid overrides it
        result = json.loads((twin / "result.json").read_text())
        result["key"] += "-twin"
        (twin / "cell.json").write_text(json.dumps(config))
        (twin / "result.json").write_text(json.dumps(result))
    paths = write_report([out, other], tmp_path / "joint")
    frame = pd.read_parquet(paths["parquet"])
    assert len(frame) == 8 + 4
    assert set(frame["method"]) == {"hash", "qr", "hash[shared=True]"}
    assert (frame[frame["method"] == "hash[shared=True]"]["test_auc"] == 0.123).all()
    assert (frame[frame["method"] == "hash"]["test_auc"] != 0.123).all()
    assert "| hash[shared=True] |" in paths["markdown"].read_text()
    with pytest.raises(ValueError, match="needs --out"):
        write_report([out, other])
    with pytest.raises(ValueError, match="pass --overwrite"):
        write_report([out, other], tmp_path / "joint")
    write_report([out, other], tmp_path / "joint", overwrite=True)  # an earlier report


def test_cells_of_another_protocol_report_as_their_own_row(tiny_sweep, tmp_path):
    # The same method trained for more epochs is another experiment: never one mean.
    out, _ = tiny_sweep
    other = tmp_path / "longer"
    shutil.copytree(out, other)
    for cell in list((other / "cells").glob("hash-*")):
        config = json.loads((cell / "cell.json").read_text())
        config["protocol"]["epochs"] = 6.0
        (cell / "cell.json").write_text(json.dumps(config))
        cell.rename(cell.with_name(cell.name + "-longer"))
    frame = pd.read_csv(write_report([out, other], tmp_path / "joint")["csv"])
    assert set(frame["method"]) == {"hash", "qr", "hash{epochs=6.0}"}
    assert (frame["method"] == "hash{epochs=6.0}").sum() == 4


def test_report_refuses_a_folder_it_did_not_write(tiny_sweep, tmp_path):
    out, _ = tiny_sweep
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "summary.md").write_text("my notes")
    for overwrite in (False, True):  # a user's summary.md is never replaced
        with pytest.raises(ValueError, match="not empty and not a sweep report"):
            write_report(out, mine, overwrite=overwrite)
        assert (mine / "summary.md").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_a_failed_report_creates_nothing(tmp_path, capsys):
    from ctr.cli import main

    notsweep = tmp_path / "notsweep"
    notsweep.mkdir()
    for sweep in (tmp_path / "nonexistent" / "x", notsweep):
        assert main(["sweep", "report", str(sweep)]) == 2
        assert "no finished cells" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["notsweep"]


def test_a_cell_finished_under_other_method_defaults_is_kept_and_named(
    tiny_sweep, tiny_data, tmp_path
):
    out, results = tiny_sweep
    assert all(
        r["method_defaults"]["keep_share"] is not None for r in results if r["method"] == "hash"
    )
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    stale = next(iter(sorted((copy / "cells").glob("hash-*"))))
    result = json.loads((stale / "result.json").read_text())
    result["method_defaults"]["keep_share"] = 0.123  # as if the default changed since
    (stale / "result.json").write_text(json.dumps(result))
    old = next(iter(sorted((copy / "cells").glob("qr-*"))))
    result = json.loads((old / "result.json").read_text())
    del result["method_defaults"]  # written before defaults were recorded
    (old / "result.json").write_text(json.dumps(result))
    lines = []
    again = run_sweep(_spec(tiny_data), copy, threads=1, log=lines.append)
    text = "\n".join(lines)
    assert f"{stale.name} finished under other hash defaults (keep_share: 0.123 -> " in text
    assert "1 finished cells predate recorded method defaults" in text
    assert "0 to run" in lines[0]  # kept, not retrained
    assert [r["test_auc"] for r in again] == [r["test_auc"] for r in results]


def test_cell_keys_are_stable_and_name_the_run_dirs(tiny_sweep, tiny_data):
    out, _ = tiny_sweep
    cells = _spec(tiny_data).cells()
    raw = cells[0].to_json()
    reordered = {k: raw[k] for k in reversed(list(raw))}
    assert cell_key(reordered) == cell_key(cells[0]) == cells[0].key
    assert len({cell_key(c) for c in cells}) == len(cells)
    assert all((cell_dir(out, c) / "result.json").exists() for c in cells)


def test_unreachable_budgets_are_recorded_without_training(tiny_data, tmp_path):
    spec = _spec(tiny_data, methods=["full", "hash"], budgets=["2x", "100000x"], seeds=[0])
    spec.protocol.epochs = 0.05
    results = run_sweep(spec, tmp_path / "s", threads=1, log=lambda _: None)
    status = {(r["method"], r["budget"]): r["status"] for r in results}
    assert status[("full", "2x")] == "infeasible" and status[("hash", "100000x")] == "infeasible"
    assert status[("hash", "2x")] == "done"
    dirs = [cell_dir(tmp_path / "s", c) for c in spec.cells()]
    for d, r in zip(dirs, results, strict=True):
        assert bool(list(d.glob("p*"))) == (r["status"] == "done")  # no run dir when infeasible
    assert "Not reachable" in write_report(tmp_path / "s")["markdown"].read_text()


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "ctr.cli", *args], env


def test_kill_after_first_cell_then_rerun_with_two_workers(tiny_sweep, tiny_data, tmp_path):
    # kill -9 after the first finished cell (one process); the rerun (two worker processes)
    # keeps it and finishes the rest, with exactly the single-process results.
    _, serial = tiny_sweep
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec(tiny_data, methods=["hash"]).to_json()))
    out = tmp_path / "s"
    cmd, env = _cli("sweep", "run", "--spec", str(spec), "--out", str(out), "--threads", "1")
    results = out / "cells"
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if list(results.glob("*/result.json")):
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kept = {p: (p.stat().st_mtime_ns, p.read_text()) for p in results.glob("*/result.json")}
    assert 1 <= len(kept) < 4
    cmd += ["--workers", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(kept)} done, {4 - len(kept)} to run" in done.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in kept} == kept
    finished = [json.loads(p.read_text()) for p in results.glob("*/result.json")]
    by_key = {r["key"]: r for r in serial}
    assert len(finished) == 4
    assert all(r["test_auc"] == by_key[r["key"]]["test_auc"] for r in finished)


def test_ray_executor_on_a_local_instance(tiny_sweep, tiny_data, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    _, serial = tiny_sweep
    spec = tmp_path / "spec.json"
    one_cell = _spec(tiny_data, methods=["hash"], budgets=["2x"], seeds=[0])
    spec.write_text(json.dumps(one_cell.to_json()))
    out = tmp_path / "s"
    cmd, env = _cli(
        "sweep",
        "run",
        "--spec",
        str(spec),
        "--out",
        str(out),
        "--threads",
        "1",
        "--executor",
        "ray",
        "--address",
        "local",
    )
    proc = subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=400)  # bounded: a loaded 2-core machine
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    by_key = {r["key"]: r for r in serial}
    results = [json.loads(p.read_text()) for p in out.glob("cells/*/result.json")]
    assert len(results) == 1 and results[0]["status"] == "done"
    assert all(r["test_auc"] == by_key[r["key"]]["test_auc"] for r in results)


def test_pareto_front_keeps_points_nothing_smaller_beats():
    points = [(10, 0.70), (20, 0.69), (30, 0.75), (5, 0.60), (30, 0.74)]
    assert pareto_front(points) == [(5, 0.60), (10, 0.70), (30, 0.75)]


def _cells(aucs):
    return [
        {"seed": i, "test_auc": a, "status": "done", "serve_bytes": 1} for i, a in enumerate(aucs)
    ]


def test_comparison_with_full_needs_three_seeds_and_a_gap_beyond_noise():
    full = _cells([0.740, 0.742, 0.738])
    assert compare(_cells([0.750, 0.753, 0.749]), full) == "above"
    assert compare(_cells([0.700, 0.705, 0.702]), full) == "below"
    assert compare(_cells([0.745, 0.739, 0.741]), full) == "tie"  # gains of both signs
    assert compare(_cells([0.750, 0.753]), full) == "tie"  # two seeds decide nothing
    # Every gain positive but the spread of gains exceeds their mean: noise.
    assert compare(_cells([0.741, 0.752, 0.739]), full) == "tie"
    lines = against_full(
        {
            ("full", "1x"): full,
            ("hash", "10x"): _cells([0.700, 0.705, 0.702]),
            ("tt", "10x"): _cells([0.75]),
        }
    )
    assert any("hash @ 10x" in x and "below full" in x for x in lines)
    assert any("tt @ 10x" in x and "undecided (1 seed(s))" in x for x in lines)
    # A method fit partly on the validation split is flagged wherever it is compared.
    dnis = [{**r, "learns_on_validation": True} for r in _cells([0.750, 0.753, 0.749])]
    lines = against_full({("full", "1x"): full, ("dnis", "2x"): dnis})
    assert any(x.startswith("- dnis † @ 2x") and "above full" in x for x in lines)
    assert learns_on_validation("dnis") and learns_on_validation("autodim")
    assert not learns_on_validation("dnis", {"search_holdout": 0.1})
    assert not learns_on_validation("tt") and not learns_on_validation("no-such-method")


def test_auto_batch_size_gives_200_steps_in_range():
    assert auto_batch_size(48_000) == 256  # clamped: 187 steps
    assert auto_batch_size(800_000) == 2048 and 800_000 // 2048 >= 200
    assert auto_batch_size(10**8) == 4096


def test_train_defaults_learn_on_60k_synthetic_rows(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["synth", "--rows", "60000", "--out", str(data), "--no-progress"]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["options"]["min_count"] == 10
    assert main(["train", "--data", str(data), "--out", str(run), "--no-progress"]) == 0
    assert "batch size 256" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["test_auc"] >= 0.70


def test_optimizer_axis_gives_each_optimizer_its_own_lrs():
    from ctr.sweep import ProtocolConfig, effective_protocol

    plain = ProtocolConfig(table_lrs=[0.05], embedding_l2s=[0.0], optimizers=[])
    assert plain.points() == [{"table_lr": 0.05, "embedding_l2": 0.0}]
    axis = ProtocolConfig(
        table_lrs=[0.05], embedding_l2s=[0.0], optimizers=["rowwise_adagrad", "adam"]
    )
    points = axis.points()
    assert [p.get("table_optimizer") for p in points] == [None, "adam", "adam", "adam"]
    assert [p["table_lr"] for p in points] == [0.05, 3e-4, 1e-3, 3e-3]
    assert axis.train_config(points[1], seed=0, batch_size=64).table_optimizer == "adam"
    assert axis.train_config(points[0], seed=0, batch_size=64).table_optimizer == "rowwise_adagrad"
    # Cells written before the axis (no "optimizers" recorded) trained the Adagrad grid alone;
    # the axis at rowwise Adagrad alone trains the same points.
    old = {"table_lrs": [0.05], "embedding_l2s": [0.0]}
    assert effective_protocol(old)["grid"] == [{"table_lr": 0.05, "embedding_l2": 0.0}]
    alone = ProtocolConfig(table_lrs=[0.05], embedding_l2s=[0.0], optimizers=["rowwise_adagrad"])
    assert alone.points() == effective_protocol(old)["grid"]


def test_records_round_trip_and_keep_the_keys_earlier_sweeps_wrote():
    import dataclasses

    from ctr.sweep import Cell, CellResult, ProtocolConfig
    from ctr.sweep.spec import SUMMARY_KEYS

    spec = SweepSpec.from_json(
        {"data": "d", "methods": ["hash"], "budgets": ["2x"], "reference": False}
    )
    (cell,) = spec.cells()
    # A cell's key hashes the JSON sweeps have always written: finished cells keep their dirs.
    written = {
        "data": "d",
        "model": "deepfm",
        "model_options": {},
        "dim": 16,
        "method": "hash",
        "budget": "2x",
        "method_options": {},
        "seed": 0,
        "protocol": dataclasses.asdict(ProtocolConfig()),
    }
    assert cell.to_json() == written and cell.key == cell_key(written)
    assert Cell.from_json(json.loads(json.dumps(written))) == cell
    # A cell written before the optimiser axis trained the Adagrad grid alone.
    old = {**written, "protocol": {"table_lrs": [0.05], "embedding_l2s": [0.0]}}
    assert Cell.from_json(old).protocol.points() == [{"table_lr": 0.05, "embedding_l2": 0.0}]

    done = CellResult.of(
        cell,
        "done",
        summary={"test_auc": 0.75, "valid_auc": 0.76},
        chosen={"table_lr": 0.05},
        batch_size=256,
        grid=[{"table_lr": 0.05, "valid_auc": 0.76}],
        grid_train_seconds=1.0,
        cell_seconds=2.0,
    )
    raw = json.loads(json.dumps(done.to_json()))
    assert set(raw) == {
        *("data", "model", "method", "budget", "seed", "status", "key"),
        *("method_defaults", "code_version", *SUMMARY_KEYS, "chosen", "batch_size", "grid"),
        *("grid_train_seconds", "cell_seconds"),
    }
    assert raw["test_auc"] == 0.75 and raw["key"] == cell.key
    assert CellResult.from_json(raw) == done and CellResult.from_json(raw).to_json() == raw
    infeasible = CellResult.of(cell, "infeasible", reason="needs more bytes")
    raw = infeasible.to_json()
    assert raw["reason"] == "needs more bytes" and "test_auc" not in raw and "grid" not in raw
    assert CellResult.from_json(raw) == infeasible
