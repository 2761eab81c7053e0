"""Threads follow the CPUs a process may use; a run that cannot fit memory is refused first."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import ctr.serving.compact  # noqa: F401 - imported before the clock starts: timing the check only
import ctr.training.run  # noqa: F401
from ctr.cli import main
from ctr.training import resources


def test_available_cpus_follow_affinity_and_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert resources.available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    assert resources.available_cpus(tmp_path) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert resources.available_cpus(v1) == 1
    assert resources.available_cpus(tmp_path / "absent") == affinity


def test_available_memory_is_capped_by_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:    8000000 kB\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert resources.available_memory_bytes(tmp_path, meminfo) == 8_000_000 * 1024
    (tmp_path / "memory.max").write_text(f"{3 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{1 << 30}\n")
    assert resources.available_memory_bytes(tmp_path, meminfo) == 2 << 30


def test_configure_threads_sleeps_idle_threads_and_warns_once(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(resources, "available_cpus", lambda: 1)
    monkeypatch.setattr(resources, "busy_cpus", lambda: 3.0)
    monkeypatch.setattr(resources, "_warned", False)
    try:
        assert resources.configure_threads(warn=False) == 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        assert capsys.readouterr().err == ""
        resources.configure_threads()
        resources.configure_threads()
        assert not resources.warn_if_oversubscribed()
        err = capsys.readouterr().err
        assert err.count("warning:") == 1 and "1 CPU(s) available" in err
    finally:
        torch.set_num_threads(before)


def test_busy_cpus_reads_the_load_and_runnable_tasks(tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.50 0.40 0.30 4/171 1234\n")
    assert resources.busy_cpus(loadavg) == 3  # three runnable besides this one
    loadavg.write_text("2.50 0.40 0.30 1/171 1234\n")
    assert resources.busy_cpus(loadavg) == 2.5


def test_a_run_that_cannot_fit_memory_is_refused_before_allocating(
    tiny_data: Path, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 50 << 20, raising=False)
    run = tmp_path / "run"
    argv = ["train", "--data", str(tiny_data), "--out", str(run), "--no-progress"]
    started = time.monotonic()
    assert main([*argv, "--dim", "64", "--max-steps", "1"]) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "needs at least" in err and "lower --dim" in err and "\n" == err[-1]
    assert not run.exists()
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 1 << 40)
    assert main([*argv, "--dim", "4", "--max-steps", "1"]) == 0


@pytest.mark.skipif(
    resources.available_memory_bytes() > 64 << 30, reason="this machine could hold the run"
)
def test_the_reported_dim_is_refused_on_this_machine(tiny_data: Path, tmp_path, capsys):
    """The reported case as given (--dim 100000), nothing patched: over 100 GB to evaluate."""
    started = time.monotonic()
    argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--dim", "100000"]
    assert main([*argv, "--no-progress", "--max-steps", "1"]) == 2
    assert time.monotonic() - started < 5
    assert "needs at least" in capsys.readouterr().err
