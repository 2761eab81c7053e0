"""The gpu_smoke bench section: one line and nothing else without CUDA; its per-method pipeline
(train, export, predict, serve) on the CPU here, on CUDA where there is one."""

from __future__ import annotations

import pytest

from bench import gpu_smoke
from tests.repo.test_bench import driver


def test_without_cuda_the_section_says_it_was_skipped_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(gpu_smoke, "skip_reason", lambda: "no CUDA device here")
    monkeypatch.setattr("bench.common.write_result", lambda name, result: "x.json")
    assert driver().main(["--only", "gpu_smoke"]) == 0
    assert capsys.readouterr().out.splitlines() == ["gpu_smoke: skipped: no CUDA device here"]


@pytest.mark.parametrize("method", ["full", "pep"])
def test_a_method_trains_exports_predicts_and_serves(method, tiny_data, tmp_path):
    row = gpu_smoke.smoke_one(method, tiny_data, tmp_path, steps=4, device="cpu")
    assert row["status"] == "ok", row
    assert 0.0 <= row["test auc"] <= 1.0 and row["export s"] >= 0


def test_a_failing_method_is_a_row_not_an_exception(tiny_data, tmp_path):
    row = gpu_smoke.smoke_one("full", tiny_data, tmp_path, steps=4, device="gpu")
    assert row["status"].startswith("ValueError: --device") and "test auc" not in row


@pytest.mark.cuda
def test_the_section_on_cuda(tiny_data, tmp_path):
    for method in ("full", "hash", "pep"):
        row = gpu_smoke.smoke_one(method, tiny_data, tmp_path / method, steps=4)
        assert row["status"] == "ok", row
