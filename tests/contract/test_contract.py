"""Conformance suite: every registered method honours the compressor contract.

Parametrised over ``compressors.available()``, so a new method is tested by registering it:
budgets met (or a clean ``BudgetError`` before training), ``solve()`` bytes equal the built
method's, plans rebuild the method, export round trips give the trained model's predictions
(table methods at every storage dtype too), a killed run resumes to the same weights, a
2-process DMP run trains or refuses clearly, and bad options give one-line errors.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressors import (
    BudgetError,
    OptionError,
    Plan,
    TableMethod,
    available,
    build_compressor,
    build_from_plan,
    option_spec,
    parse_budget,
    solve,
)
from compressors.core.registry import COMPRESSORS
from ctr.cli import main
from ctr.embedding import features_from_dataset
from ctr.serving.compact import CompactModel
from ctr.serving.export import export
from ctr.training.run import RunConfig, load_run_model, train_run
from ctr.training.trainer import TrainConfig
from datasets.loader import BatchLoader
from tests.helpers import ROOT
from tests.helpers.torchrun import torchrun_command

METHODS = available()
TABLE_METHODS = [m for m in METHODS if issubclass(COMPRESSORS[m], TableMethod)]
# Methods whose serving bytes a stage decides (the pruning family): --storage serves their
# trained masks at another dtype, each field in the form it takes there.
SEARCHED_METHODS = [m for m in METHODS if COMPRESSORS[m].searched]
DIM = 8
# Logit tolerance of a table served at each dtype against the fp32 model (tiny trained weights).
STORAGE_ATOL = {"fp32": 1e-5, "fp16": 2e-3, "int8": 2e-2, "int4": 0.25, "int2": 1.0}
# Methods whose own export is lossy against their trained model: int16 trains integer rows
# and serves them as fp16 rows.
EXPORT_ATOL = {"int16": STORAGE_ATOL["fp16"]}


def _config(data, name, budget, **train):
    defaults = dict(epochs=0.5, batch_size=512, progress=False, eval_every=2, seed=1)
    return RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [8]},
        dim=DIM,
        compressor=name,
        budget=budget,
        train=TrainConfig(**{**defaults, **train}),
    )


def _train_budget(name, features):
    for budget in ("2x", "1x"):
        try:
            solve(name, features, DIM, budget)
            return budget
        except BudgetError:
            continue
    raise AssertionError(f"{name} fits neither 2x nor 1x")


@pytest.fixture(scope="module")
def features(tiny_data):
    return features_from_dataset(tiny_data)


@pytest.fixture(scope="module")
def trained(tiny_data, features, tmp_path_factory):
    """``trained(name)``: a finished short run of method ``name`` (trained once per module)."""
    runs: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("contract")

    def get(name):
        if name not in runs:
            runs[name] = root / name
            train_run(_config(tiny_data, name, _train_budget(name, features)), runs[name])
        return runs[name]

    return get


def _logits(model, data):
    batch = next(iter(BatchLoader(data, "test", batch_size=300)))
    with torch.no_grad():
        return model(batch.dense_features, batch.sparse_features)


# ---------------------------------------------------------------- budgets and plans
@pytest.mark.parametrize("budget", ["2x", "10x"])
@pytest.mark.parametrize("name", METHODS)
def test_budget_is_met_or_refused_before_training(name, budget, features):
    limit = parse_budget(budget, sum(f.cardinality for f in features) * DIM * 4)
    try:
        plan = solve(name, features, DIM, budget)
    except BudgetError as e:
        assert name in str(e) and "\n" not in str(e)
        with pytest.raises(BudgetError):
            build_compressor(name, features, DIM, budget)
        return
    assert plan.serve_bytes <= limit
    built = build_compressor(name, features, DIM, budget)
    if built.searched:  # a stage decides the bytes; the plan is the bound it keeps
        assert plan.details["bound"] and plan.serve_bytes == limit
        return
    assert built.memory().serve_bytes == plan.serve_bytes <= limit


@pytest.mark.parametrize("name", METHODS)
def test_solve_equals_the_built_method_and_its_plan_rebuilds_it(name, features):
    budget = _train_budget(name, features)
    plan = solve(name, features, DIM, budget)
    built = build_compressor(name, features, DIM, budget)
    memory = built.memory()
    if built.searched:  # the plan bounds the bytes a stage will decide; training is exact
        assert plan.train_bytes == memory.train_bytes
    else:
        assert (plan.serve_bytes, plan.train_bytes, plan.parts) == (
            memory.serve_bytes,
            memory.train_bytes,
            memory.parts,
        )
    assert plan.to_json() == built.plan().to_json()
    recorded = Plan.from_json(json.loads(json.dumps(plan.to_json())))  # as plan.json holds it
    assert build_from_plan(recorded, features).plan().to_json() == plan.to_json()


@pytest.mark.parametrize("name", METHODS)
def test_a_method_says_whether_it_learns_on_validation_batches(name, features):
    # The sweep report flags such methods (the validation split is training data to them).
    built = build_compressor(name, features, DIM, _train_budget(name, features))
    assert type(built).learns_on_validation == any(s.bilevel for s in built.stages)


def test_a_changed_plan_is_refused_naming_the_entry_but_a_searched_floor_is_not(features):
    hashed = solve("hash", features, DIM, "4x").to_json()
    hashed["serve_bytes"] += 8  # as if an older solver had laid the tables out otherwise
    with pytest.raises(ValueError, match=r"serve_bytes: \d+ recorded, \d+ now"):
        build_compressor("hash", features, DIM, "4x").check_plan(Plan.from_json(hashed))
    searched = solve("optembed", features, DIM, "4x").to_json()
    assert searched["details"]["bound"]
    searched["details"]["floor_bytes"] += 1000  # an older, larger remap format
    build_compressor("optembed", features, DIM, "4x").check_plan(Plan.from_json(searched))
    entry = solve("pep", features, DIM, "4x").to_json()
    entry["details"]["target_entries"] += 100  # what an older pointer format bought
    build_compressor("pep", features, DIM, "4x").check_plan(Plan.from_json(entry))
    searched["details"]["train_bytes"] += 8
    with pytest.raises(ValueError, match="details.train_bytes"):
        build_compressor("optembed", features, DIM, "4x").check_plan(Plan.from_json(searched))


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("name", METHODS)
def test_export_round_trip_predicts_like_the_trained_model(name, trained, tiny_data, tmp_path):
    run = trained(name)
    model, _ = load_run_model(run)
    model.eval()
    manifest = export(model, tmp_path / "a")
    compact = CompactModel.load(tmp_path / "a")
    diff = (_logits(compact, tiny_data) - _logits(model, tiny_data)).abs().max()
    assert diff < EXPORT_ATOL.get(name, 1e-4), diff
    tensors = load_file(str(tmp_path / "a" / "tensors.safetensors"))
    written = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("emb"))
    assert written == manifest["embedding"]["serve_bytes"]
    summary = json.loads((run / "summary.json").read_text())
    assert written == summary["serve_bytes"] <= summary["budget_bytes"]


@pytest.mark.parametrize("storage", ["fp16", "int8", "int4", "int2"])
@pytest.mark.parametrize("name", TABLE_METHODS)
def test_export_at_another_storage_reuses_the_trained_layout(
    name, storage, trained, tiny_data, tmp_path
):
    run = trained(name)
    out = tmp_path / storage
    plan = json.loads((run / "plan.json").read_text())
    dims = {t["dim"] for t in plan["details"]["layout"]["tables"]}
    code = main(["export", str(run), "--out", str(out), "--storage", storage])
    if any((d * {"fp16": 16, "int8": 8, "int4": 4, "int2": 2}[storage]) % 16 for d in dims):
        assert code == 2 and not out.exists()  # fbgemm cannot hold these rows: refused
        return
    assert code == 0
    model, _ = load_run_model(run)
    compact = CompactModel.load(out)
    diff = (_logits(compact, tiny_data) - _logits(model.eval(), tiny_data)).abs().max()
    assert diff < STORAGE_ATOL[storage], diff
    served = compact.manifest["embedding"]["config"]["tables"]
    assert [(t["rows"], t["dim"]) for t in served] == [
        (t["rows"], t["dim"]) for t in plan["details"]["layout"]["tables"]
    ]
    assert {t["dtype"] for t in served} == {storage}


@pytest.mark.parametrize("storage", ["fp16", "int8", "int4", "int2"])
@pytest.mark.parametrize("name", SEARCHED_METHODS)
def test_export_of_a_searched_layout_at_another_storage(
    name, storage, trained, tiny_data, tmp_path, capsys
):
    run = trained(name)
    capsys.readouterr()  # training's own warnings, when this test trained the run
    out = tmp_path / storage
    code = main(["export", str(run), "--out", str(out), "--storage", storage])
    if code:  # a searched dim fbgemm cannot pack at this dtype: refused in one line
        err = capsys.readouterr().err
        assert code == 2 and not out.exists()
        assert name in err and storage in err and err.count("\n") == 1
        return
    model, _ = load_run_model(run)
    compact = CompactModel.load(out)
    diff = (_logits(compact, tiny_data) - _logits(model.eval(), tiny_data)).abs().max()
    assert diff < STORAGE_ATOL[storage], diff
    config = compact.manifest["embedding"]["config"]
    assert config["dtype"] == storage and {t["dtype"] for t in config["tables"]} <= {storage}
    tensors = load_file(str(out / "tensors.safetensors"))
    written = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("emb"))
    assert written == compact.manifest["embedding"]["serve_bytes"]
    csr_values = [t for k, t in tensors.items() if k.endswith(".values")]
    if storage in ("int4", "int2"):
        assert not csr_values  # kept rows only: fbgemm's row-wise codes
    for values in csr_values:
        assert values.dtype == {"fp16": torch.float16, "int8": torch.int8}[storage]


def test_storage_of_a_fixed_format_method_is_refused(trained, tmp_path, capsys):
    fixed = next(m for m in METHODS if m not in TABLE_METHODS and m in ("int8", "binary"))
    run = trained(fixed)
    capsys.readouterr()  # training's own warnings, when this test trained the run
    assert main(["export", str(run), "--out", str(tmp_path / "a"), "--storage", "fp16"])
    err = capsys.readouterr().err
    assert f"{fixed}: its serving format is fixed" in err and err.count("\n") == 1


# ---------------------------------------------------------------- resume
# A known defect: dpq's and mgqe's resumed quantizer keys differed from the uninterrupted
# run's in two whole-suite runs on a loaded machine (mgqe once, dpq once), never in a run of
# this test alone, of this module, or of tests/compressors with it (each repeated). The likely
# cause, advanced indexing's backward adding repeated indices in thread order, is fixed
# (``take_rows``; test_determinism.py), but no loaded whole-suite run has confirmed it yet,
# so they stay expected to fail sometimes, not always.
FLAKY_RESUME = {"dpq", "mgqe"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            m,
            marks=pytest.mark.xfail(
                reason="resume not always exact under load (likely cause fixed, unconfirmed)",
                strict=False,
            ),
        )
        if m in FLAKY_RESUME
        else m
        for m in METHODS
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_weights(name, tiny_data, features, tmp_path):
    # The uninterrupted run trains here, beside the resumed one, under the same process state.
    cfg = _config(tiny_data, name, _train_budget(name, features))
    whole = tmp_path / "whole"
    train_run(cfg, whole)
    first = train_run(_config(tiny_data, name, cfg.budget, max_steps=2), tmp_path / "r")
    assert first == {"finished": False, "steps": 2}
    train_run(cfg, tmp_path / "r")
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- DMP
@pytest.fixture(scope="module")
def dmp_results(tiny_data, tmp_path_factory):
    """One torchrun process group that trains every method (tests/helpers/contract_dmp.py)."""
    out = tmp_path_factory.mktemp("contract_dmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = torchrun_command(
        str(ROOT / "tests" / "helpers" / "contract_dmp.py"), str(tiny_data), str(out)
    )
    # Every method in one process group: minutes alone, far more on a shared machine.
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "dmp.json").read_text())


@pytest.mark.parametrize("name", METHODS)
def test_dmp_trains_or_refuses_clearly(name, dmp_results):
    result = dmp_results[name]
    if result["status"] != "trained":
        message = result["message"]
        assert name in message and "\n" not in message, result  # a clear, one-line refusal
        assert result["type"] in ("RuntimeError", "ValueError", "NotImplementedError"), result


# ---------------------------------------------------------------- options
def _ill_typed(spec):
    if "str" not in spec.type:
        return "not-a-number"
    if "Mapping" in spec.type or "dict" in spec.type:
        return 3.5
    return [1, 2]


@pytest.mark.parametrize("name", METHODS)
def test_bad_options_give_one_line_errors(name, features):
    specs = option_spec(name)
    for call in (solve, build_compressor):
        with pytest.raises(OptionError) as unknown:
            call(name, features, DIM, "1x", no_such_option=1)
        message = str(unknown.value)
        assert f"'{name}'" in message and "no_such_option" in message and "\n" not in message
        assert all(s.name in message for s in specs)
        for spec in specs:
            with pytest.raises(OptionError, match=f"option {spec.name}=") as bad:
                call(name, features, DIM, "1x", **{spec.name: _ill_typed(spec)})
            assert "\n" not in str(bad.value)


def test_catalog_file_is_in_sync_with_the_registry():
    from compressors.catalog import CATALOG_FILE, build_catalog

    fresh = json.loads(json.dumps(build_catalog(), default=repr))
    assert json.loads(CATALOG_FILE.read_text()) == fresh, "run: python -m compressors.catalog"
    assert sorted(fresh) == METHODS
    assert all(o["help"] for entry in fresh.values() for o in entry["options"])
