"""ctr.training's records and seams: RunSummary, the resolved table optimiser, plan inputs
at build (PlanContext), the placement, the one row-wise Adagrad."""

import json

import pytest
import torch

from compressors.core.base import PlanContext, plan_context
from compressors.core.optim import EPS, RowwiseAdagrad, SparseRowOptimizer
from compressors.core.registry import build_compressor, solve
from ctr.training.config import (
    DEFAULT_TABLE_LRS,
    RunConfig,
    TrainConfig,
    resolve_table_optimizer,
)
from ctr.training.placement import SingleProcess, placement_for
from ctr.training.run import build_run_model, is_run_dir, train_run
from ctr.training.summary import RunSummary
from ctr.training.trainer import Trainer
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta


def _features():
    from compressors.core.base import FeatureSpec

    return [FeatureSpec(f"f{i}", 50 + 10 * i) for i in range(4)]


def test_auto_resolves_to_the_methods_optimizer_at_its_default_lr():
    assert resolve_table_optimizer("full") == (
        "rowwise_adagrad",
        DEFAULT_TABLE_LRS["rowwise_adagrad"],
    )
    assert resolve_table_optimizer("pep") == ("adam", DEFAULT_TABLE_LRS["adam"])
    assert resolve_table_optimizer("pep", "sgd", 0.2) == ("sgd", 0.2)
    assert resolve_table_optimizer("pep", "adagrad") == ("adagrad", 0.05)
    with pytest.raises(ValueError, match="--table-optimizer"):
        resolve_table_optimizer("full", "lion")
    cfg = RunConfig(data="x", compressor="optembed").resolved()
    assert (cfg.train.table_optimizer, cfg.train.table_lr) == ("adam", 1e-3)


def test_plan_inputs_travel_through_solve_and_build():
    features = _features()
    for name in ("hash", "pep", "tt"):
        context = PlanContext(table_optimizer="adam", module_optimizer="adam")
        plan = solve(name, features, 8, "2x", context=context)
        built = build_compressor(name, features, 8, "2x", context=context)
        assert built.table_optimizer == "adam"
        assert built.plan().train_bytes == plan.train_bytes
        with plan_context(context):
            assert solve(name, features, 8, "2x").train_bytes == plan.train_bytes
        # Adam keeps two moments per value where rowwise Adagrad keeps one float per row.
        assert plan.train_bytes > solve(name, features, 8, "2x").train_bytes
    assert build_compressor("full", features, 8, "1x").table_optimizer == "rowwise_adagrad"


def test_run_summary_round_trips_and_spells_summary_json(tiny_data, tmp_path):
    cfg = RunConfig(
        data=str(tiny_data),
        model="lr",
        dim=4,
        train=TrainConfig(epochs=0.2, batch_size=512, progress=False),
    )
    summary = train_run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert tuple(saved) == RunSummary.keys() and saved == summary
    record = RunSummary.from_json({**saved, "later": 1})
    assert record.extra == {"later": 1} and record.to_json() == {**saved, "later": 1}
    assert RunSummary.from_json(saved).budget_bytes == saved["full_bytes"]  # "1x"
    with pytest.raises(ValueError, match="test_auc"):
        RunSummary.from_json({k: v for k, v in saved.items() if k != "test_auc"})
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (recorded["table_optimizer"], recorded["table_lr"]) == ("rowwise_adagrad", 0.05)
    assert is_run_dir(tmp_path / "run")
    (tmp_path / "run" / ".checkpoint.pt.abc123.tmp").write_bytes(b"")  # a killed write
    assert is_run_dir(tmp_path / "run")


def test_trainer_refuses_a_model_planned_for_another_table_optimizer(tiny_data):
    meta = DatasetMeta.load(tiny_data)
    cfg = RunConfig(data=str(tiny_data), model="lr", dim=4, compressor="pep", budget="2x")
    model = build_run_model(cfg, meta)  # auto: PEP's Adam
    assert model.embedding.compressor.table_optimizer == "adam"
    loader = BatchLoader(meta, "valid", 512)
    trainer = Trainer(model, loader, loader, TrainConfig(progress=False))
    assert (trainer.config.table_optimizer, trainer.config.table_lr) == ("adam", 1e-3)
    assert isinstance(trainer.placement, SingleProcess) and trainer.placement.is_main
    with pytest.raises(ValueError, match="built for table optimizer 'adam'"):
        Trainer(model, loader, loader, TrainConfig(table_optimizer="sgd", progress=False))


def test_placement_is_chosen_once():
    assert isinstance(placement_for(None), SingleProcess)
    single = placement_for(None)
    assert (single.rank, single.world_size, len(single.rng_states())) == (0, 1, 1)
    t = torch.arange(3.0)
    assert torch.equal(single.gather(t), t)


def test_one_rowwise_adagrad_rule():
    """The optimizer of parameters and the sparse rows' one take identical steps, with
    fbgemm's eps."""
    assert EPS == 1e-8
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(20, 4, generator=gen)
    param = torch.nn.Parameter(start.clone())
    dense = RowwiseAdagrad([param], lr=0.1)
    rows_opt = SparseRowOptimizer("rowwise_adagrad", 20, 4)
    mine = start.clone()
    for _ in range(5):
        grad = torch.randn(20, 4, generator=gen)
        param.grad = grad.clone()
        dense.step()
        rows = torch.arange(20)
        mine[rows] = rows_opt.step(rows, mine[rows], grad, 0.1)
    torch.testing.assert_close(param.detach(), mine)
    assert not torch.allclose(mine, start)
