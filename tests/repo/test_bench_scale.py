"""The scale bench section's core at a tiny vocabulary: its figures, fits and refusals."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from bench import scale
from datasets.prepared import DatasetMeta
from datasets.synthetic import SyntheticConfig, generate_synthetic


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_fit_exponent_recovers_the_power_law() -> None:
    ids = [1e4, 1e5, 1e6, 4e6]
    assert scale.fit_exponent(ids, [3.0 * x**0.8 for x in ids]) == pytest.approx(0.8)
    assert scale.fit_exponent(ids, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    # Least squares through noise: the slope of the logs, not of the first and last point.
    noisy = [x * f for x, f in zip(ids, [1.0, 1.3, 0.8, 1.0], strict=True)]
    logs = [math.log(x) for x in ids]
    mean = sum(logs) / 4
    slope = sum((lx - mean) * math.log(y) for lx, y in zip(logs, noisy, strict=True)) / sum(
        (lx - mean) ** 2 for lx in logs
    )
    assert scale.fit_exponent(ids, noisy) == pytest.approx(slope)
    assert scale.fit_exponent([1e6], [5.0]) is None  # one point fits nothing
    assert scale.fit_exponent([1e5, 1e6], [None, 5.0]) is None  # a refused point is skipped


def test_expected_ids_predict_the_generated_vocabulary(tmp_path) -> None:
    cfg = scale.synthetic_config(8000)
    assert scale.expected_ids(cfg) == pytest.approx(8000, rel=0.01)
    meta = generate_synthetic(tmp_path / "d", cfg, progress=False)
    assert sum(f.cardinality for f in meta.sparse) == pytest.approx(8000, rel=0.03)
    with pytest.raises(ValueError, match="--scale-ids: 1,000 ids is below"):
        scale.synthetic_config(1000)
    # The estimate follows the generator: a config it was not solved for predicts too.
    other = SyntheticConfig(rows=6000, scale=0.002, min_count=1)
    got = generate_synthetic(tmp_path / "e", other, progress=False)
    assert sum(f.cardinality for f in got.sparse) == pytest.approx(
        scale.expected_ids(other), rel=0.03
    )


def test_parse_ids_names_the_flag() -> None:
    assert scale.parse_ids("1e6,4e6,1e6") == [1_000_000, 4_000_000]
    with pytest.raises(ValueError, match="--scale-ids"):
        scale.parse_ids("1M")


def test_section_at_a_tiny_scale_records_figures_and_refusals(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CTR_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(scale, "CACHE", tmp_path / "cache")
    args_list = [
        "--scale-ids", "8000",
        "--methods", "full,hash,qr",
        "--scale-steps", "3",
        "--scale-warmup", "1",
        "--scale-batch-size", "512",
        "--scale-options", json.dumps({"qr": {"no_such_option": 1}}),
        "--scale-budgets", json.dumps({"hash": "12x"}),
    ]  # fmt: skip
    result = scale.run(_args(*args_list))
    json.dumps(result)  # the bench writes it as JSON
    (data,) = result["data"]
    meta = DatasetMeta.load(data["path"])
    assert data["ids"] == sum(f.cardinality for f in meta.sparse)
    assert data["ids"] == pytest.approx(8000, rel=0.05)
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"full", "hash", "qr"}
    for method in ("full", "hash"):
        r = runs[method]
        assert r["status"] == "ok", r
        assert r["finished"]
        assert r["budget"] == ("1x" if method == "full" else "12x")
        assert r["step_ms"] > 0 and r["step_cpu_ms"] > 0
        assert r["steps_by_stage"]["train"] == 3
        assert set(r["stage_s"]) == {"train"}
        assert r["train_bytes"] > 0 and r["serve_bytes"] > 0
        assert r["peak_rss_bytes"] >= r["export_peak_rss_bytes"] >= r["fit_peak_rss_bytes"]
        assert r["fit_peak_rss_bytes"] > r["base_rss_bytes"] > 0
        assert r["export_bytes"] > r["serve_bytes"] * 0.9 and r["export_s"] > 0
        assert r["lookups_per_s"] > 0
    assert runs["hash"]["serve_bytes"] * 11 < runs["full"]["serve_bytes"]
    # A method that cannot run is a row with its reason, not an exception.
    assert runs["qr"]["status"] == "refused"
    assert "no_such_option" in runs["qr"]["reason"]
    assert "\n" not in runs["qr"]["reason"]
    assert result["fits"]["full"]["points"] == 1
    assert result["fits"]["full"]["step_exponent"] is None  # one vocabulary: no slope
    assert [r["method"] for r in result["table"]] == ["full", "hash", "qr"]
    assert result["table"][2]["refused"]
    assert result["plot"].endswith("scale.png")
    # The plot, the dataset and the saved runs stay in the bench cache; no scratch artifact
    # is left behind.
    assert sorted(p.name for p in (tmp_path / "cache" / "scale").iterdir()) == ["data", "runs"]
    assert len(list((tmp_path / "cache" / "scale" / "runs").iterdir())) == 3

    # --scale-reuse builds the table from the saved runs of the same settings, and reruns
    # what differs.
    def no_rerun(spec, timeout):
        raise AssertionError(f"reran {spec['method']}")

    monkeypatch.setattr(scale, "run_child", no_rerun)
    again = scale.run(_args(*args_list, "--scale-reuse"))
    assert again["runs"] == result["runs"]
    with pytest.raises(AssertionError, match="reran full"):
        scale.run(_args(*args_list, "--scale-reuse", "--scale-steps", "2"))


def test_a_run_past_its_timeout_is_a_refusal(tmp_path) -> None:
    spec = {"data": str(tmp_path / "missing"), "method": "full"}
    result = scale.run_child(spec, timeout=0.05)
    assert result == {"status": "refused", "reason": "timed out after 0.05 s"}


def test_scale_step_interleaves_methods_with_full(tmp_path, monkeypatch) -> None:
    from bench import scale_step

    monkeypatch.setattr(scale_step, "CACHE", tmp_path / "cache")
    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    scale_step.add_arguments(parser)
    argv = ["--scale-ids", "2e4", "--methods", "pep", "--scale-batch-size", "256"]
    args = parser.parse_args([*argv, "--scale-step-count", "3", "--scale-warmup", "1"])
    rows = {r["method"]: r for r in scale_step.bench_scale_step(args)["rows"]}
    assert list(rows) == ["full", "pep"]
    assert rows["full"]["median / full"] == 1 and rows["pep"]["stage"] == "search"
    assert rows["pep"]["table optimizer"] == "adam" and rows["pep"]["mean cpu ms"] > 0
