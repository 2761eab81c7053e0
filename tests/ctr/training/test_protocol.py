"""The fair-comparison protocol's trainer pieces: embedding L2 (lazy == dense), one optimiser
family for embedding modules, plateau lr decay, exact resume with all of them on."""

import json

import pytest
import torch

from compressors.core.decay import RowDecay
from compressors.core.optim import RowwiseAdagrad
from ctr.training.run import RunConfig, build_run_model, train_run
from ctr.training.trainer import TrainConfig, Trainer
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta


def test_row_decay_lazy_equals_dense_under_sparse_sgd():
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, 4, generator=gen)
    tables = {"lazy": start.clone(), "dense": start.clone()}
    decays = {mode: RowDecay({"t": tables[mode]}, rate=0.3, mode=mode) for mode in tables}
    for step in range(40):
        ids = torch.randint(0, 50, (7,), generator=gen)
        grad = torch.randn(7, 4, generator=gen)
        lr = 0.1 if step < 20 else 0.05  # a plateau decay mid-run stays exact
        for mode, w in tables.items():
            decays[mode].touch({"t": ids})
            w.index_add_(0, ids, grad + 0.5 * w[ids], alpha=-lr)  # depends on the row
            decays[mode].advance(lr)
    decays["lazy"].flush()
    torch.testing.assert_close(tables["lazy"], tables["dense"], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(tables["dense"], start)


def _trainer(data, compressor="full", budget="1x", **train):
    cfg = RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [16]},
        dim=8,
        compressor=compressor,
        budget=budget,
        # Rowwise Adagrad named: TrainConfig's "auto" would give the pruning family Adam.
        train=TrainConfig(
            **{
                "epochs": 1,
                "batch_size": 256,
                "progress": False,
                "table_optimizer": "rowwise_adagrad",
                **train,
            }
        ),
    )
    meta = DatasetMeta.load(data)
    model = build_run_model(cfg, meta)
    loader = BatchLoader(meta, "train", 256, shuffle=True, drop_last=True)
    return Trainer(model, loader, BatchLoader(meta, "valid", 4096), cfg.train)


def _train_steps(trainer, steps=12):
    for batch in list(trainer.train.epoch(0))[:steps]:
        trainer.train_step(batch)
    return trainer.full_state()  # flushes lazy decay


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd"])
def test_lazy_l2_on_fused_tables_equals_dense_l2(tiny_data, optimizer):
    common = dict(table_optimizer=optimizer, table_lr=0.1, embedding_l2=0.5)
    lazy = _train_steps(_trainer(tiny_data, l2_mode="lazy", **common))
    dense = _train_steps(_trainer(tiny_data, l2_mode="dense", **common))
    plain = _train_steps(_trainer(tiny_data, table_optimizer=optimizer, table_lr=0.1))
    tables = [k for k in lazy if "embedding_bags" in k]
    assert tables
    for k in tables:
        torch.testing.assert_close(lazy[k], dense[k], rtol=1e-4, atol=1e-6)
    # The decay really acts (fbgemm ignores weight_decay on CPU: this is the only L2).
    assert sum(dense[k].norm() for k in tables) < 0.99 * sum(plain[k].norm() for k in tables)


def test_protocol_trains_embedding_modules_with_the_table_optimizer(tiny_data):
    own = _trainer(tiny_data, "tt", "4x")
    protocol = _trainer(tiny_data, "tt", "4x", module_optimizer="table", table_lr=0.07)
    name = own.embedding_groups[0]
    assert isinstance(own.optimizers[name], torch.optim.Adam)
    opt = protocol.optimizers[name]
    assert isinstance(opt, RowwiseAdagrad) and opt.param_groups[0]["lr"] == 0.07
    before = {
        k: v.clone() for k, v in protocol.model.embedding.compressor.module.state_dict().items()
    }
    _train_steps(protocol, 3)
    after = protocol.model.embedding.compressor.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_train_bytes_follow_the_protocol_optimizer_and_count_lazy_l2_state(tiny_data):
    own = _trainer(tiny_data, "tt", "4x")
    protocol = _trainer(
        tiny_data, "tt", "4x", module_optimizer="table", embedding_l2=0.01, l2_mode="lazy"
    )
    cores = list(own.model.embedding.compressor.module.parameters())
    weights = sum(p.numel() for p in cores) * 4
    rows = sum(p.shape[0] for p in cores) * 4
    own_bytes = own.model.embedding.memory().train_bytes
    protocol_bytes = protocol.model.embedding.memory().train_bytes
    # Adam keeps two moments per weight, row-wise Adagrad one accumulator per row.
    assert own_bytes - protocol_bytes == 2 * weights - rows
    # Lazy L2 keeps one float64 per fused table row; dense L2 and no L2 keep nothing.
    table_rows = sum(t.rows for t in protocol.model.embedding.compressor.table_specs)
    assert protocol.decay_state_bytes() == 8 * table_rows > 0
    assert own.decay_state_bytes() == 0
    dense = _trainer(tiny_data, "tt", "4x", embedding_l2=0.01, l2_mode="dense")
    assert dense.decay_state_bytes() == 0


def test_rowwise_adagrad_matches_fbgemm_rule():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    opt = RowwiseAdagrad([w], lr=0.5)
    w.grad = torch.tensor([[0.3, 0.4], [0.0, 0.0]])
    opt.step()
    s = (0.09 + 0.16) / 2
    expected = torch.tensor([[1 - 0.5 * 0.3 / s**0.5, 2 - 0.5 * 0.4 / s**0.5], [3.0, 4.0]])
    torch.testing.assert_close(w.detach(), expected)
    RowwiseAdagrad([torch.nn.Parameter(torch.ones(5))]).step()  # 1-D parameters work


@pytest.mark.parametrize(
    ("compressor", "budget", "optimizer"),
    [("tt", "4x", "rowwise_adagrad"), ("full", "1x", "adam"), ("pep", "2x", "adam")],
)
def test_plateau_decay_and_resume_with_l2_are_exact(
    tiny_data, tmp_path, compressor, budget, optimizer
):
    def cfg(**extra):
        train = dict(
            table_optimizer=optimizer,
            table_lr=0.05,  # high enough for Adam's plateaus too
            epochs=3,
            batch_size=256,
            progress=False,
            evals_per_epoch=4,
            patience=100,
            lr_decay=0.5,
            embedding_l2=1e-3,
            module_optimizer="table",
            **extra,
        )
        return RunConfig(
            data=str(tiny_data),
            model="deepfm",
            model_options={"hidden": [16]},
            dim=8,
            compressor=compressor,
            budget=budget,
            train=TrainConfig(**train),
        )

    whole = train_run(cfg(), tmp_path / "whole")
    assert train_run(cfg(max_steps=17), tmp_path / "split")["finished"] is False
    split = train_run(cfg(), tmp_path / "split")
    assert split["test_auc"] == whole["test_auc"]
    lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line)["lr_scale"] for line in lines]
    assert len(history) >= 8 and min(history) < 1.0


def _fit_steps(data, compressor, budget, steps=10, **train):
    trainer = _trainer(data, compressor, budget, max_steps=steps, table_lr=0.1, **train)
    assert not trainer.fit()["finished"]
    prefix = "embedding.compressor."
    return {
        k: v
        for k, v in trainer.full_state().items()  # flushes lazy decay
        if k.startswith(prefix) and isinstance(v, torch.Tensor) and v.is_floating_point()
    }


# One method of each family whose embedding rows train as floats: fused TorchRec tables
# (full, hash, ptq, dnis, mde) and the pruning family's own row table (optembed, pep,
# deeplight). int8/int16/alpt train integer codes, which the protocol's L2 does not reach.
L2_METHODS = [
    ("full", "1x"),
    ("hash", "4x"),
    ("ptq", "2x"),
    ("optembed", "2x"),
    ("pep", "2x"),
    ("deeplight", "2x"),
    ("dnis", "2x"),
    ("mde", "2x"),
]


@pytest.mark.parametrize(("method", "budget"), L2_METHODS)
def test_embedding_l2_reaches_every_family(tiny_data, method, budget):
    torch.manual_seed(0)
    plain = _fit_steps(tiny_data, method, budget, embedding_l2=0.0)
    decayed = _fit_steps(tiny_data, method, budget, embedding_l2=0.5)
    rows = [k for k, v in plain.items() if v.dim() == 2 and k.endswith("weight")]
    assert rows, sorted(plain)
    # Every row table shrinks: L2 reaches rows the batches never read, too.
    for k in rows:
        assert decayed[k].norm() < 0.95 * plain[k].norm(), k


@pytest.mark.parametrize("method", ["pep", "optembed"])
def test_lazy_l2_on_method_row_tables_equals_dense(tiny_data, method):
    common = dict(embedding_l2=0.5)
    lazy = _fit_steps(tiny_data, method, "2x", l2_mode="lazy", **common)
    dense = _fit_steps(tiny_data, method, "2x", l2_mode="dense", **common)
    for k in lazy:
        torch.testing.assert_close(lazy[k], dense[k], rtol=1e-4, atol=1e-6, msg=k)


def test_sparse_row_adam_is_lazy_adam():
    """The row tables' Adam equals PyTorch's SparseAdam (lazy Adam) step for step."""
    from compressors.precision.integer import SparseRowOptimizer

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(30, 4, generator=gen)
    mine, theirs = start.clone(), torch.nn.Parameter(start.clone())
    rows_opt = SparseRowOptimizer("adam", 30, 4)
    reference = torch.optim.SparseAdam([theirs], lr=0.01)
    for _ in range(25):
        rows = torch.unique(torch.randint(0, 30, (6,), generator=gen))
        grad = torch.randn(len(rows), 4, generator=gen)
        mine[rows] = rows_opt.step(rows, mine[rows], grad, 0.01)
        theirs.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), grad, (30, 4))
        reference.step()
    torch.testing.assert_close(mine, theirs.detach())
    assert rows_opt.nbytes == 2 * 30 * 4 * 4 + 8


@pytest.mark.parametrize(("method", "budget"), [("full", "1x"), ("pep", "2x")])
def test_adam_is_a_protocol_optimizer_for_tables_and_row_tables(tiny_data, method, budget):
    adam = _trainer(tiny_data, method, budget, table_optimizer="adam", table_lr=1e-3)
    adagrad = _trainer(tiny_data, method, budget)
    rows = sum(f.cardinality for f in adam.model.embedding.compressor.features)
    extra = adam.model.embedding.memory().train_bytes - adagrad.model.embedding.memory().train_bytes
    assert extra == rows * (2 * 8 - 1) * 4 + (8 if method == "pep" else 0)  # moments vs one acc.
    before = _fit_steps(tiny_data, method, budget, steps=3, table_optimizer="adam")
    after = _fit_steps(tiny_data, method, budget, steps=6, table_optimizer="adam")
    rows_key = [k for k in before if k.endswith("weight") and before[k].dim() == 2]
    assert rows_key and any(not torch.equal(before[k], after[k]) for k in rows_key)
