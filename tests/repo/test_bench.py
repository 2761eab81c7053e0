"""bench.py drives the sections of the bench/ package: every section imports and is named by
``--help`` and ``--list``, and the helpers sections share behave (the sweep's feasibility
rule, result files, the load generator in its own process). No section runs here: they train
for minutes and belong to ``make bench``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import ROOT

FLAGS = (
    "--only",
    "--list",
    "--rows",
    "--methods",
    "--budgets",
    "--storages",
    "--seeds",
    "--grid-lrs",
    "--grid-l2s",
    "--grid-optimizers",
    "--sweep-epochs",
    "--workers",
)


def driver() -> object:
    """bench.py as a module (``import bench`` is the package beside it)."""
    spec = importlib.util.spec_from_file_location("bench_driver", ROOT / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_driver(*args: str) -> str:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout


def test_every_section_imports_with_a_summary() -> None:
    bench = driver()
    assert [n for n, (_, _, default) in bench.SECTIONS.items() if default] == ["train"]
    for name in bench.SECTIONS:
        fn = bench.section(name)
        assert callable(fn), name
        assert (fn.__doc__ or "").strip(), f"section {name} has no summary for --list"


def test_help_and_list_name_every_section_and_flag() -> None:
    sections = driver().SECTIONS
    shown = run_driver("--help")
    for name in sections:
        assert name in shown, name
    for flag in FLAGS:
        assert flag in shown, flag
    listed = [line.split()[0] for line in run_driver("--list").splitlines()]
    assert listed == list(sections)


def test_unknown_section_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        driver().main(["--only", "train,nope"])
    assert stop.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_fits_is_the_sweeps_feasibility_rule(tiny_data: Path) -> None:
    from bench.common import fits
    from ctr.sweep import Cell, feasibility

    assert fits(tiny_data, "full", "1x") is None
    assert fits(tiny_data, "hash", "10x") is None
    refused = fits(tiny_data, "hash", "100000x")
    assert refused and refused.startswith("hash:")
    cell = {"data": str(tiny_data), "method": "hash", "dim": 16, "budget": "100000x"}
    assert refused == feasibility(Cell.from_json(cell))


def test_write_result_replaces_the_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.common

    monkeypatch.setattr(bench.common, "CACHE", tmp_path)
    (tmp_path / "results").mkdir()
    bench.common.write_result("x", {"a": 1})
    path = bench.common.write_result("x", {"a": 2, "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": 2, "p": str(tmp_path)}
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["x.json"]


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as ctr serve

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"predictions": [0.5]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _load_against_stub(**spec: object) -> dict:
    """The load generator's figures against a keep-alive stub server answering one row."""
    from bench.serving import _run_load

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        return _run_load(
            {
                "port": server.server_address[1],
                "bodies": ['{"instances": [{}]}'],
                "rows": 1,
                "clients": 2,
                "warmup_s": 0.1,
                **spec,
            }
        )
    finally:
        server.shutdown()
        server.server_close()


def test_load_generator_runs_in_its_own_process() -> None:
    figures = _load_against_stub(seconds=0.5, max_requests=50)
    assert figures["errors"] == 0
    assert figures["requests/s"] > 0
    assert figures["p50_ms"] <= figures["p99_ms"]
    assert len(figures["windows"]) == 1 and figures["disturbed windows"] in (0, 1)


def test_load_generator_measures_windows_and_what_else_ran() -> None:
    """Several windows, each kept with its own figures and the machine's use meanwhile; the
    result is their median (errors summed)."""
    # the server is this process's thread
    figures = _load_against_stub(seconds=0.3, windows=3, watch_pids=[os.getpid()], max_requests=30)
    windows = figures["windows"]
    assert len(windows) == 3
    assert figures["rows/s"] == sorted(w["rows/s"] for w in windows)[1]
    for w in windows:
        assert {"server cores", "loadgen cores", "other cores", "disturbed", "loadavg"} <= set(w)
    assert figures["disturbed windows"] == sum(w["disturbed"] for w in windows)


def test_a_window_is_disturbed_when_other_processes_used_the_cores() -> None:
    """Other cores = the machine's busy cores less the watched processes' and the load
    generator's own; over the threshold the window is flagged."""
    from bench.loadgen import DISTURBED_CORES, Usage

    before, after = Usage(), Usage()
    before.time, after.time = 0.0, 2.0
    before.busy, after.busy = 10.0, 13.0  # 1.5 cores busy
    before.watched, after.watched = 5.0, 6.0  # the server: 0.5 cores
    before.own, after.own = 1.0, 1.2  # the load generator: 0.1 cores
    before.wait, after.wait = 0.0, 0.5
    got = after.since(before)
    assert got["other cores"] == pytest.approx(0.9)
    assert got["server runq ms/s"] == pytest.approx(250.0)
    assert got["disturbed"] is True
    after.busy = 10.0 + 2 * (0.6 + DISTURBED_CORES / 2)
    assert after.since(before)["disturbed"] is False


def test_driver_runs_a_section_and_writes_its_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.common

    main = driver()
    monkeypatch.setattr(bench.common, "CACHE", tmp_path)
    monkeypatch.setitem(main.SECTIONS, "tiny", ("common", "unused", False))
    monkeypatch.setattr(main, "section", lambda name: lambda args: {"rows": args.rows})
    assert main.main(["--only", "tiny", "--rows", "7"]) == 0
    figures = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert figures["rows"] == 7 and "wall_s" in figures


def test_serving_modules_of_every_format_look_up_each_id() -> None:
    import torch
    from torchrec import KeyedJaggedTensor

    from bench.lookups import (
        binary_tables,
        codebook_tables,
        int_tables,
        lookup_rates,
        pruned_index_tables,
    )

    cards, dim = [50, 300], 16
    modules = {
        **int_tables(cards, dim, 0, ("fp32", "int8")),
        **binary_tables(cards, dim, (1, 2)),
        **codebook_tables(cards, dim),
        **pruned_index_tables(cards, dim, keep=0.5),
    }
    gen = torch.Generator().manual_seed(0)
    batches = [
        KeyedJaggedTensor(
            keys=["C1", "C2"],
            values=torch.cat([torch.randint(0, c, (64,), generator=gen) for c in cards]),
            lengths=torch.ones(128, dtype=torch.int64),
        )
        for _ in range(2)
    ]
    with torch.inference_mode():
        for name, module in modules.items():
            assert module(batches[0]).reshape(64, -1).shape == (64, 2 * dim), name
        # int8 rows are the fp32 rows quantised: close, not equal.
        fp32, int8 = modules["fp32"](batches[0]), modules["int8"](batches[0])
        assert torch.allclose(fp32, int8, atol=0.01)
    rates = lookup_rates(modules, batches, repeats=1)
    assert set(rates) == set(modules) and all(r > 0 for r in rates.values())
