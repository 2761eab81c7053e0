"""pep: soft thresholds that prune to the budget's sparsity (frequent ids defend their
entries), a lottery-ticket retrain with the found mask, the fallback reported, exact export
bytes and predictions at fp32/fp16/int8, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, FeatureSpec, build_compressor
from compressors.core.optim import Adam
from compressors.core.storage import row_bytes
from compressors.pruning.bytes import bitmap_bytes
from compressors.pruning.entry_pruned import top_entries
from compressors.pruning.pep import PEP, soft_threshold
from ctr.embedding import features_from_dataset
from ctr.training.config import TrainConfig
from ctr.training.optimizers import build_optimizers
from ctr.training.run import load_run_model, train_run
from ctr.training.trainer import Trainer
from datasets.loader import BatchLoader
from tests.helpers.pruning_checks import check_artifact, check_resume, config, zeroed_auc


def test_soft_threshold_formula_and_gradients():
    w = torch.tensor([-0.5, -0.05, 0.0, 0.02, 0.3], requires_grad=True)
    s = torch.tensor(-2.0, requires_grad=True)
    g = torch.sigmoid(s)
    out = soft_threshold(w, g)
    expected = torch.sign(w) * torch.clamp(w.abs() - g, min=0)
    torch.testing.assert_close(out, expected)
    assert out[1] == 0 and out[3] == 0 and out[4] > 0
    out[4].backward()  # d/ds of (0.3 - g(s)) = -g'(s)
    torch.testing.assert_close(s.grad, -g.detach() * (1 - g.detach()))


def test_budget_becomes_a_number_of_entries():
    feats = [FeatureSpec("a", 1000), FeatureSpec("b", 200)]
    plan = PEP.solve_budget(feats, 16, 20_000)
    # 5 bytes per fp32 entry (value + uint8 column); row pointers: a 2-byte offset per row
    # (+1) and an int32 base per 64 of them.
    pointers = (1001 + 201) * 2 + (16 + 4) * 4
    assert plan["target_entries"] == (20_000 - pointers) // 5
    assert build_compressor("pep", feats, 16, 20_000).target_entries == plan["target_entries"]
    # int8 CSR: 2 bytes an entry, plus one fp32 scale per field.
    int8 = PEP.solve_budget(feats, 16, 20_000, storage="int8")
    assert int8["target_entries"] == (20_000 - pointers - 2 * 4) // 2
    # int4 has no CSR form: every entry may need an int4 row of its own, every field a remap
    # (a rank bitmap here: 20 bytes per 64 ids).
    int4 = PEP.solve_budget(feats, 16, 20_000, storage="int4")
    remaps = bitmap_bytes(1000) + bitmap_bytes(200)
    assert remaps == (16 + 4) * 20
    assert int4["target_entries"] == (20_000 - remaps) // row_bytes(16, "int4")
    with pytest.raises(BudgetError, match="row pointers"):
        build_compressor("pep", feats, 16, "40x")
    with pytest.raises(ValueError, match="int4"):
        build_compressor("pep", feats, 6, "2x", storage="int4")  # 3 code bytes: not packable
    # The reference's granularity (a threshold per entry) is the default; its thresholds and
    # their Adam moments are training bytes.
    layer = build_compressor("pep", feats, 16, 38_400)
    assert layer.threshold.shape == (1200, 16) and layer.granularity == "feature_dim"
    assert PEP.solve_budget(feats, 16, 38_400)["train_bytes"] == layer.memory().train_bytes
    assert float(torch.sigmoid(layer.threshold.max())) < 1e-6  # nothing pruned at the start
    assert build_compressor("pep", feats, 16, "2x", granularity="field_dim").threshold.shape == (
        2,
        16,
    )
    assert build_compressor("pep", feats, 16, "2x", granularity="field").threshold.shape == (2, 1)


@pytest.mark.parametrize("granularity", ["feature_dim", "field"])
def test_a_mask_that_overshoots_the_budget_is_filled_nearest_threshold_first(granularity):
    feats = [FeatureSpec("a", 1000), FeatureSpec("b", 200)]

    def frozen(**options):
        torch.manual_seed(0)
        layer = build_compressor("pep", feats, 16, "10x", granularity=granularity, **options)
        with torch.no_grad():  # thresholds that jumped past the target: ~99% pruned
            layer.table.weight.normal_(0, 0.01)
            layer.threshold.fill_(float(torch.logit(torch.tensor(0.025))))
        layer._freeze(step=7)
        return layer

    paper, filled = frozen(fill_budget=False), frozen()
    found = int(paper.mask.sum())
    assert found < paper.target_entries  # the overshoot, kept as found
    assert not paper.hyperparameters()["filled_entries"]
    assert int(filled.mask.sum()) == filled.target_entries  # the budget's entries exactly
    assert filled.hyperparameters()["filled_entries"] == filled.target_entries - found
    assert filled.reached_sparsity == paper.reached_sparsity  # what the thresholds reached
    assert bool((paper.mask <= filled.mask).all())
    margin = filled.table.weight.abs()  # one threshold for all: nearest = largest |w|
    back = filled.mask & ~paper.mask
    assert margin[back].min() >= margin[~filled.mask].max()


@pytest.fixture(scope="module")
def run(learn_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pep") / "run"
    # 64 search steps: threshold_lr 0.4 starts the pruning after ~25 (module docstring).
    train_run(config(learn_data, "pep", "5x", threshold_lr=0.4, check_every=2), out)
    return out


def test_thresholds_reach_the_budget_and_frequent_ids_defend_their_entries(run, learn_data):
    model, _ = load_run_model(run)
    layer = model.embedding.compressor
    initial = torch.load(run / "initial.pt", weights_only=True)
    w0 = initial["embedding.compressor.table.weight"]
    s0 = initial["embedding.compressor.threshold"]
    at_init = float((soft_threshold(w0, torch.sigmoid(s0)) == 0).float().mean())
    hp = layer.hyperparameters()
    # The learned thresholds (not the magnitude fallback) reached the budget's sparsity.
    assert bool(layer.found) and not hp["fallback"]
    assert hp["reached_sparsity"] >= hp["target_sparsity"] > at_init + 0.5
    # The data gradient holds the thresholds of frequent ids down: the most frequent fifth
    # of the rows ends with lower thresholds, and keeps more entries, than the rarest fifth.
    freq = torch.cat([torch.as_tensor(f.frequencies) for f in features_from_dataset(learn_data)])
    order = torch.argsort(freq.float(), stable=True)
    fifth = len(order) // 5
    rare, frequent = order[:fifth], order[-fifth:]
    s = layer.threshold.detach()
    assert s[frequent].mean() < s[rare].mean() - 0.05
    assert layer.mask[frequent].float().mean() > 2 * layer.mask[rare].float().mean()


def test_the_record_says_what_the_thresholds_reached_when_pruning_dips_validation(
    learn_data, tmp_path, monkeypatch
):
    # Validation AUC falls through the search (as pruning can make it) and evaluations are
    # frequent with patience 1, so the search's first evaluation is its best. A search stage
    # that early-stopped or restored its best weights would roll the thresholds and the
    # found mask back to before the target was reached and report the magnitude fallback
    # (fallback=True, reached_sparsity near 0) although the thresholds had reached it; the
    # search stage runs to its end (early_stop=False) and keeps its architecture
    # (restore_best=False), so the record says what the thresholds did.
    evaluate = Trainer.evaluate

    def falling_during_the_search(self, loader, max_batches=None):
        metrics = evaluate(self, loader, max_batches)
        if self.state.stage == 0 and loader is self.valid:
            metrics["auc"] = 0.9 - self.state.step / 1000
        return metrics

    monkeypatch.setattr(Trainer, "evaluate", falling_during_the_search)
    cfg = config(learn_data, "pep", "5x", threshold_lr=0.4, check_every=2)
    cfg.train.eval_every, cfg.train.patience = 4, 1
    train_run(cfg, tmp_path / "run")
    layer = load_run_model(tmp_path / "run")[0].embedding.compressor
    history = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    search = [h for h in history if h["stage"] == "search"]
    hp = layer.hyperparameters()
    assert not hp["fallback"] and hp["reached_sparsity"] >= hp["target_sparsity"], hp
    steps = math.ceil(0.2 * len(BatchLoader(learn_data, "train", 1024)))
    assert search[-1]["step"] == steps  # the whole schedule ran
    assert search[0]["step"] < hp["found_step"] < steps  # the best came before the target
    assert int(layer.mask.sum()) <= layer.target_entries


def test_retrain_keeps_the_mask(run):
    model, _ = load_run_model(run)
    layer = model.embedding.compressor
    assert layer.nonzeros() <= layer.target_entries
    assert int(layer.mask.sum()) <= layer.target_entries
    initial = torch.load(run / "initial.pt", weights_only=True)["embedding.compressor.table.weight"]
    w = layer.table.weight
    assert torch.equal(w[~layer.mask], initial[~layer.mask])  # pruned entries never trained
    assert not torch.equal(w[layer.mask], initial[layer.mask])  # the ticket retrained
    assert layer.memory().serve_bytes <= layer.budget_bytes


def test_pep_learns(run, learn_data):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_auc"] > 0.66
    assert zeroed_auc(run, learn_data) < summary["test_auc"] - 0.04


def test_artifact_matches_serve_bytes_and_predictions(run, learn_data, tmp_path):
    manifest = check_artifact(run, learn_data, tmp_path / "a", atol=1e-5)
    forms = {p["form"] for p in manifest["embedding"]["config"]["plans"]}
    assert forms <= {"csr", "rows", "dense", "empty"} and forms


def test_int8_export_serves_csr_codes_with_exact_bytes(run, learn_data, tmp_path):
    layer = load_run_model(run)[0].embedding.compressor
    fp32, nnz = layer.memory().serve_bytes, layer.nonzeros()
    manifest = check_artifact(run, learn_data, tmp_path / "a", atol=0.05, storage="int8")
    cfg = manifest["embedding"]["config"]
    assert cfg["dtype"] == "int8" and {p["form"] for p in cfg["plans"]} == {"csr"}
    # Each entry's value shrinks from 4 bytes to 1; each field adds its 4-byte scale.
    assert manifest["embedding"]["serve_bytes"] == fp32 - 3 * nnz + 4 * len(cfg["plans"])


def test_fp16_storage_and_field_dim_thresholds_report_the_fallback(learn_data, tmp_path, caplog):
    out = tmp_path / "run"
    train_run(
        config(
            learn_data,
            "pep",
            "3x",
            epochs=0.1,
            storage="fp16",
            granularity="field_dim",
            threshold_lr=None,  # the reference's: the network's lr
        ),
        out,
    )
    model, _ = load_run_model(out)
    layer = model.embedding.compressor
    assert model.embedding.memory().serve_bytes <= layer.budget_bytes
    # 32 steps at the network's lr cannot start the pruning: the fallback says so.
    hp = layer.hyperparameters()
    assert hp["fallback"] and 0 <= hp["reached_sparsity"] < hp["target_sparsity"]
    assert "magnitude pruning" in caplog.text
    check_artifact(out, learn_data, tmp_path / "a", atol=1e-2)


def test_each_stage_resumes_after_a_kill(tiny_data, tmp_path):
    cfg = config(tiny_data, "pep", "3x", epochs=0.5, check_every=2, threshold_lr=0.2)
    check_resume(cfg, tmp_path, [5, 12])


def _kjt(features, batch: int, gen: torch.Generator) -> KeyedJaggedTensor:
    ids = [torch.randint(0, f.cardinality, (batch,), generator=gen) for f in features]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features],
        values=torch.cat(ids),
        lengths=torch.ones(batch * len(features), dtype=torch.int64),
    )


def test_search_steps_equal_the_dense_threshold_gradients_and_adam():
    # The thresholds' gradient is sparse (the rows a batch read) and core.optim.Adam applies
    # it as the dense gradient torch's Adam stepped before: every threshold moves (coupled
    # L2), read ones by their data gradient too; the table's rows alike.
    feats = [FeatureSpec("a", 500), FeatureSpec("b", 300)]
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layers.append(build_compressor("pep", feats, 16, "5x", threshold_init=-3.0))
    old, new = layers

    def dense_values(rows, weight):  # the formula before, its gradient dense
        return soft_threshold(weight, torch.sigmoid(old.threshold[rows]))

    old.values = dense_values
    cfg = TrainConfig(lr=0.01)
    opts = []
    for layer, kind in ((old, torch.optim.Adam), (new, None)):
        built = build_optimizers(layer, [nn.Parameter(torch.zeros(1))], cfg).train["compressor0"]
        if kind is not None:  # the old optimizer, with the group's settings
            group = built.param_groups[0]
            built = kind([layer.threshold], lr=group["lr"], weight_decay=group["weight_decay"])
        opts.append(built)
    assert isinstance(opts[1], Adam)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = _kjt(feats, 64, gen)
        target = torch.randn(64, 2, 16, generator=gen)
        for layer, opt in zip(layers, opts, strict=True):
            layer.train()
            opt.zero_grad()
            (layer(batch) * target).sum().backward()
            opt.step()
            layer.table.step(0.05)
        assert new.threshold.grad.is_sparse and not old.threshold.grad.is_sparse
        torch.testing.assert_close(new.threshold, old.threshold, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(new.table.weight, old.table.weight, rtol=1e-6, atol=1e-7)
    assert (new.threshold.detach() != -3.0).all()  # every threshold moved


@pytest.mark.parametrize("granularity", ["feature_dim", "field"])
def test_nonzeros_counts_what_the_model_reads(granularity):
    feats = [FeatureSpec("a", 700), FeatureSpec("b", 300)]
    layer = build_compressor("pep", feats, 16, "5x", granularity=granularity)
    with torch.no_grad():
        layer.table.weight.normal_(0, 0.05)
        layer.table.weight[::7] = 0.0
        layer.threshold.normal_(-3.0, 1.0)
        g = torch.sigmoid(layer.threshold[:5])
        if granularity == "feature_dim":
            layer.table.weight[:5] = g  # exactly at the threshold: pruned
    expected = int((layer.all_values() != 0).sum())
    assert 0 < expected < layer.mask.numel()
    assert layer.nonzeros() == expected


def test_top_entries_selects_what_topk_selects_chunk_by_chunk():
    # The stage-end selections run over chunks of rows (no table-sized copies): the same
    # entries as torch.topk over the flattened table, ties by position.
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n, d = (
            int(torch.randint(1, 200, (1,), generator=g)),
            int(torch.randint(1, 17, (1,), generator=g)),
        )
        x = torch.randn(n, d, generator=g)  # distinct values: one answer
        if trial % 3 == 0:
            x[torch.rand(n, d, generator=g) < 0.3] = float("-inf")
        if trial % 4 == 0:
            x[torch.rand(n, d, generator=g) < 0.2] = float("inf")
        k = int(torch.randint(0, n * d + 1, (1,), generator=g))
        # No tied infinities across the cut: all of +inf in, all of -inf out.
        k = max(int((x == float("inf")).sum()), min(k, int((x > float("-inf")).sum())))
        out = torch.empty(n, d, dtype=torch.bool)
        rows = int(torch.randint(1, 40, (1,), generator=g))
        top_entries(lambda a, b, x=x: x[a:b], n, k, out, chunk_rows=rows)
        ref = torch.zeros(n * d, dtype=torch.bool)
        ref[torch.topk(x.flatten(), k, sorted=False).indices] = True
        assert torch.equal(out, ref.view(n, d)), trial
    ties = torch.tensor([[3.0, 1.0, 1.0], [1.0, 0.5, 1.0]])
    out = torch.empty(2, 3, dtype=torch.bool)
    top_entries(lambda a, b: ties[a:b], 2, 3, out, chunk_rows=1)
    assert out.tolist() == [[True, True, True], [False, False, False]]


@pytest.mark.parametrize("granularity", ["feature_dim", "field"])
def test_stage_end_masks_equal_the_whole_table_computation(granularity, monkeypatch):
    import compressors.pruning.entry_pruned as entry_pruned

    monkeypatch.setattr(entry_pruned, "_CHUNK_ROWS", 37)
    monkeypatch.setattr(entry_pruned, "_SELECT_ROWS", 53)
    feats = [FeatureSpec("a", 1000), FeatureSpec("b", 200)]

    def layer(threshold: float) -> PEP:
        torch.manual_seed(0)
        pep = build_compressor("pep", feats, 16, "10x", granularity=granularity)
        with torch.no_grad():
            pep.table.weight.normal_(0, 0.01)
            pep.threshold.normal_(threshold, 0.3)
        return pep

    # The magnitude fallback: the largest |ŵ| among the non-zeros (the whole-table code).
    pep = layer(-6.0)
    soft = pep.all_values()
    flat = torch.where(soft != 0, soft.abs(), torch.full_like(soft, -1.0)).flatten()
    want = torch.zeros(flat.numel(), dtype=torch.bool)
    want[
        torch.topk(flat, min(pep.target_entries, int((soft != 0).sum())), sorted=False).indices
    ] = True
    pep.on_stage_end(pep.stages[0], type("Ctx", (), {"step": 5})())
    assert torch.equal(pep.mask, want.view_as(pep.mask))
    # The fill after an overshoot: the pruned entries of largest |w| − g(s).
    pep = layer(float(torch.logit(torch.tensor(0.03))))
    gate = torch.sigmoid(pep.threshold)
    if granularity != "feature_dim":
        gate = gate[pep.table.field_of(torch.arange(pep.table.rows))]
    found = pep.all_values() != 0
    margin = torch.where(found, float("inf"), pep.table.weight.abs() - gate).flatten()
    want = torch.zeros(margin.numel(), dtype=torch.bool)
    want[torch.topk(margin, pep.target_entries, sorted=False).indices] = True
    assert int(found.sum()) < pep.target_entries
    pep._freeze(step=3)
    assert torch.equal(pep.mask, want.view_as(pep.mask))
