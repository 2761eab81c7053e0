"""optembed: the straight-through step, thresholds that prune the teacher's empty fields,
a budgeted evolutionary dim search, retrain with fixed masks, export, resume, ablations."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from unittest import mock

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, FeatureSpec, build_compressor
from compressors.core.storage import row_bytes
from compressors.pruning.bytes import bitmap_bytes, dim_choices, remap_bytes
from compressors.pruning.optembed import LongTailStep, OptEmbed, ste_derivative
from compressors.pruning.serving import PrunedServing
from ctr.training.run import load_run_model, train_run
from ctr.training.trainer import RunContext
from datasets.prepared import DatasetMeta
from tests.helpers.pruning_checks import check_artifact, check_resume, config, signal_of, zeroed_auc

DIM = 16


def test_ste_derivative_matches_the_reference_formula():
    x = torch.tensor([-1.5, -1.0, -0.7, -0.4, -0.1, 0.0, 0.2, 0.4, 0.41, 1.0, 1.01, 3.0])
    x.requires_grad_()
    y = LongTailStep.apply(x)
    assert torch.equal(y, (x > 0).float())
    y.backward(torch.full_like(x, 2.0))
    a = x.detach().abs()
    expected = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, 0.4, 0.0))
    torch.testing.assert_close(x.grad, 2.0 * expected)
    assert ste_derivative(torch.tensor(0.0)) == 2.0 and ste_derivative(torch.tensor(1.5)) == 0.0


def test_gradient_reaches_thresholds_and_values():
    layer = build_compressor("optembed", [FeatureSpec("a", 10), FeatureSpec("b", 6)], 4, "2x")

    kjt = KeyedJaggedTensor(
        keys=["a", "b"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1, 0])
    )
    layer.train()
    (layer(kjt).sum() + layer.penalty()).backward()
    assert layer.threshold.grad is not None and layer.threshold.grad.abs().sum() > 0
    rows, weight = layer.table._pending
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_threshold_modes_field_default_and_the_papers_one_flag_away():
    feats = [FeatureSpec("a", 10), FeatureSpec("b", 6)]
    field = build_compressor("optembed", feats, 4, "2x")
    (group,) = field.optimizer_groups()
    assert (group["optimizer"], group["lr"], field.alpha) == ("adam", 1e-2, 1e-3)
    paper = build_compressor("optembed", feats, 4, "2x", thresholds="paper")
    (group,) = paper.optimizer_groups()
    assert (group["optimizer"], group["lr"], paper.alpha) == ("sgd", 3e-4, 3e-4)
    assert build_compressor("optembed", feats, 4, "2x", alpha=0.5).alpha == 0.5
    with pytest.raises(ValueError, match="thresholds must be one of"):
        build_compressor("optembed", feats, 4, "2x", thresholds="raw")
    # Normalised: a row's norm is read in units of its field's mean norm in the batches.
    kjt = KeyedJaggedTensor(
        keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1])
    )
    for layer in (field, paper):
        with torch.no_grad():
            layer.table.weight[:10] *= 100  # field a's rows are 100x field b's
        layer.train()
        layer(kjt)
    norms = field.table.row_norms()
    torch.testing.assert_close(field.field_scale[0], norms[[1, 2]].mean())
    torch.testing.assert_close(field.field_scale[1], norms[[10 + 3, 10 + 4]].mean())
    assert torch.all(paper.scales() == 1)
    field.threshold.data.fill_(1.0)
    kept = field.current_row_mask()
    # About half of each field's seen rows are above its own mean, whatever its scale.
    assert kept[[1, 2]].sum() == 1 and kept[[13, 14]].sum() == 1


def _features() -> list[FeatureSpec]:
    sizes = (5000, 800, 300, 40, 7)
    return [
        FeatureSpec(f"C{i}", n, frequencies=torch.arange(n, 0, -1).numpy().astype("int64"))
        for i, n in enumerate(sizes)
    ]


def test_budget_floor_is_solved_by_arithmetic_and_refused_clearly():
    feats = _features()
    plan = OptEmbed.solve_budget(feats, DIM, 1_000)  # the remaps alone need ~1.2 kB
    assert not plan["feasible"] and plan["floor_bytes"] > 1_000
    with pytest.raises(BudgetError, match="one row per field"):
        build_compressor("optembed", feats, DIM, 1_000)
    ok = OptEmbed.solve_budget(feats, DIM, 60_000)
    assert ok["feasible"] and ok["serve_bytes_max"] == 60_000
    assert (
        ok["train_bytes"] == build_compressor("optembed", feats, DIM, 60_000).memory().train_bytes
    )
    with pytest.raises(BudgetError):  # -D keeps every row: 10x is out of its reach at dim 1
        build_compressor("optembed", feats, DIM, "40x", prune_rows=False)


class FakeContext:
    """A search context whose fitness rewards dims on chosen fields (no data needed): the
    layer's :meth:`OptEmbed.score` is replaced by it (see :func:`_fake_scores`)."""

    def __init__(self, layer: OptEmbed, weights: list[float], stop_after: int | None = None):
        self.layer, self.weights, self.stop_after = layer, weights, stop_after
        self.saved: dict | None = None
        self.evaluations = 0
        self.resumed = False
        _fake_scores(layer, self.fitness)

    def fitness(self, dims) -> float:
        self.evaluations += 1
        return sum(w * min(d, 8) for w, d in zip(self.weights, dims, strict=True))

    def progress(self, total: int, desc: str):
        return mock.MagicMock()

    def checkpoint(self, state: dict) -> None:
        self.saved = state
        if self.stop_after is not None and state["generation"] >= self.stop_after:
            raise KeyboardInterrupt

    def restored_state(self):
        return self.saved if self.resumed else None

    def rng(self) -> torch.Generator:
        return torch.Generator().manual_seed(3)


def _fake_scores(layer: OptEmbed, fitness) -> None:
    layer.score = lambda candidates, ctx: [float(fitness(list(c))) for c in candidates]


PAPER_POPULATION = {"mutations": 10, "crossovers": 10, "parents": 10}


def _searched(budget: int, weights: list[float], **options) -> tuple[OptEmbed, FakeContext]:
    torch.manual_seed(0)
    layer = build_compressor("optembed", _features(), DIM, budget, **options)
    with torch.no_grad():  # rows of field 0 past 1000 have tiny norms: the supernet pruned them
        layer.table.weight[1000:5000] *= 0.001
        layer.threshold.fill_(0.02)
    ctx = FakeContext(layer, weights)
    layer.run_stage(layer.stages[1], ctx)
    return layer, ctx


def test_search_finds_rewarded_dims_and_never_exceeds_the_budget():
    weights = [0.0, 1.0, 0.0, 1.0, 0.0]
    budget = 55_000
    layer, ctx = _searched(budget, weights, fill_budget=False, **PAPER_POPULATION, generations=8)
    dims = layer.dims.tolist()
    assert layer.memory().serve_bytes <= budget
    assert layer.kept_per_field()[0] <= 1001  # frozen row mask: field 0's tail is gone
    assert dims[1] >= 8 and dims[3] >= 8  # rewarded fields reach the reward's cap
    assert dims[1] + dims[3] > dims[0] + dims[2]
    # Every candidate the search could see was repaired into the budget.
    kept = layer.kept_per_field()
    mass = layer._column_mass()
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        cand = [layer._random_dim(gen) for _ in layer.features]
        assert layer.candidate_bytes(layer.repair(cand, kept, mass), kept) <= budget


def test_evolution_beats_random_search_with_the_same_evaluations():
    """On a separable landscape (reward: closeness of every field's dim to a target) the
    defaults' evolution ends far nearer the optimum than the best of as many random
    candidates; a search that drew its children at random lands with the random ones."""
    features = [FeatureSpec(f"C{i}", 50) for i in range(20)]
    target = torch.randint(1, DIM + 1, (20,), generator=torch.Generator().manual_seed(7))

    def fitness(dims) -> float:
        return -float((torch.tensor(dims) - target).abs().sum())

    gaps = []
    for seed in range(3):
        layer = build_compressor("optembed", features, DIM, "1x", prune_rows=False)
        ctx = FakeContext(layer, [0.0] * 20)
        seen = []
        _fake_scores(layer, lambda dims, seen=seen: seen.append(dims) or fitness(dims))
        ctx.rng = lambda seed=seed: torch.Generator().manual_seed(seed)
        layer.run_stage(layer.stages[1], ctx)
        evolved = fitness(layer.dims.tolist())
        assert evolved == max(fitness(d) for d in seen)  # the best candidate seen is kept
        gen = torch.Generator().manual_seed(100 + seed)
        randoms = [[layer._random_dim(gen) for _ in features] for _ in seen]
        gaps.append(evolved - max(fitness(d) for d in randoms))
    # Measured: the evolution ends 14, 16 and 31 nearer than random search (sum of |dim - target|).
    assert min(gaps) >= 6, gaps


def test_batched_auc_is_the_mann_whitney_statistic_with_ties():
    from sklearn.metrics import roc_auc_score

    from compressors.pruning.optembed import batched_auc

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(500, generator=g) < 0.3).float()
    scores = torch.randn(3, 500, generator=g)
    scores[1] = torch.round(scores[1] * 2)  # many ties
    scores[2] = labels * 0.5 + torch.randn(500, generator=g)
    got = batched_auc(scores, labels)
    for c in range(3):
        assert got[c].item() == pytest.approx(roc_auc_score(labels, scores[c]), abs=1e-12)


def test_candidates_scored_in_batch_equal_each_scored_alone(tiny_data):
    """The search's batched score (one lookup, every candidate's row and dim masks applied
    to it, one forward for all) is the AUC of the model with that candidate's dims and filled
    rows set, evaluated alone on the same sample."""
    from sklearn.metrics import roc_auc_score

    from ctr.training.run import build_run_model
    from datasets.loader import BatchLoader

    meta = DatasetMeta.load(tiny_data)
    cfg = config(tiny_data, "optembed", "4x", search_batches=3)
    torch.manual_seed(0)
    model = build_run_model(cfg, meta)
    layer = model.embedding.compressor
    with torch.no_grad():
        layer.table.weight.mul_(torch.rand(layer.table.rows, 1) * 300)  # rows that matter
        layer.threshold.fill_(float(layer.table.row_norms().median()))
        layer.row_mask.copy_(layer.current_row_mask())
        layer.frozen.fill_(True)
    assert (~layer.row_mask).sum() > layer.table.rows // 3
    loader = BatchLoader(meta, "valid", 256, shuffle=True, seed=0, drop_last=True)

    class Ctx:
        def __init__(self):
            self.model = model

        def gather(self, t):
            return t  # one process

        def valid_batches(self):
            for epoch in range(100):
                yield from loader.epoch(epoch)

    gen = torch.Generator().manual_seed(0)
    kept = layer.kept_per_field()
    candidates = [
        layer.repair([layer._random_dim(gen) for _ in layer.features], kept, layer._column_mass())
        for _ in range(5)
    ]
    scores = layer.score(candidates, Ctx())
    sample = list(itertools.islice(Ctx().valid_batches(), 3))
    supernet = layer.row_mask.clone()
    filled_any = False
    for dims, got in zip(candidates, scores, strict=True):
        with torch.no_grad():
            layer.row_mask.copy_(supernet)
            added = layer.filled_rows(dims)
            filled_any |= len(added) > 0
            layer.dims.copy_(torch.tensor(dims))
            layer.row_mask[added] = True
            assert layer.memory().serve_bytes <= layer.budget_bytes
            model.eval()
            logits = torch.cat([model(b.dense_features, b.sparse_features) for b in sample])
        labels = torch.cat([b.labels for b in sample])
        # Equal up to the float rounding of near-tied logits.
        assert got == pytest.approx(roc_auc_score(labels, logits), abs=1e-6)
    assert filled_any  # the fill is part of what a candidate is scored with
    assert max(scores) - min(scores) > 0.01


def test_unused_budget_goes_back_to_the_supernets_best_pruned_rows():
    budget = 55_000
    paper, _ = _searched(budget, [1.0] * 5, generations=3, fill_budget=False)
    filled, _ = _searched(budget, [1.0] * 5, generations=3)
    assert filled.dims.tolist() == paper.dims.tolist()  # the fill comes after the search
    assert paper.kept_per_field() == filled.supernet_kept.tolist()  # the paper's: supernet's rows
    assert (
        paper.hyperparameters()["supernet_kept_rows"]
        == filled.hyperparameters()["supernet_kept_rows"]
    )
    assert bool((paper.row_mask <= filled.row_mask).all())  # nothing kept is dropped ...
    assert filled.row_mask.sum() > paper.row_mask.sum()  # ... and pruned rows come back
    serve = filled.memory().serve_bytes
    assert paper.memory().serve_bytes < serve <= budget
    # Within a row of the budget: one more row of any field that still has some would not fit.
    kept = filled.kept_per_field()
    dims = filled.dims.tolist()
    for f, spec in enumerate(filled.features):
        if kept[f] < spec.cardinality:
            grown = list(kept)
            grown[f] += 1
            assert filled.candidate_bytes(dims, grown) > budget
    # Per field, the rows that came back are the best-scored of the pruned ones.
    score = filled.row_scores()
    for f in range(len(filled.features)):
        sl = filled.table.field_slice(f)
        back = filled.row_mask[sl] & ~paper.row_mask[sl]
        still = ~filled.row_mask[sl]
        if back.any() and still.any():
            assert score[sl][back].min() >= score[sl][still].max()


def test_thresholds_rise_by_quantile_when_rows_cannot_fit(caplog):
    budget = 8_000  # the kept rows do not fit even at dim 1
    layer, _ = _searched(budget, [1.0] * 5, generations=2)
    assert bool(layer.thresholds_raised)
    assert "thresholds raised" in caplog.text
    assert layer.memory().serve_bytes <= budget
    assert (layer.threshold > 0.02).any()


def test_search_resumes_from_its_last_generation():
    weights = [0.5, 1.0, 0.0, 1.0, 0.2]
    whole, whole_ctx = _searched(40_000, weights, generations=6)
    torch.manual_seed(0)
    layer = build_compressor("optembed", _features(), DIM, 40_000, generations=6)
    with torch.no_grad():
        layer.table.weight[1000:5000] *= 0.001
        layer.threshold.fill_(0.02)
    ctx = FakeContext(layer, weights, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        layer.run_stage(layer.stages[1], ctx)
    ctx.stop_after, ctx.resumed = None, True
    layer.run_stage(layer.stages[1], ctx)
    assert layer.dims.tolist() == whole.dims.tolist()
    assert torch.equal(layer.row_mask, whole.row_mask)


def test_int4_dims_are_packable():
    assert dim_choices(16, "int4") == [4, 8, 12, 16]
    assert dim_choices(16, "int8")[0] == 2


# ---------------------------------------------------------------- trained on synthetic data
SEARCH = {"generations": 5, "search_batches": 2}


@pytest.fixture(scope="module")
def runs(learn_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("optembed")
    specs = {
        "optembed": ("5x", dict(SEARCH, supernet_epochs=0.5)),
        "rows_int8": ("10x", dict(SEARCH, search_dims=False, storage="int8")),
        "dims": ("3x", dict(SEARCH, prune_rows=False)),
        "oov": ("5x", dict(SEARCH, generations=3, pruned_rows="field_vector")),
    }
    for name, (budget, options) in specs.items():
        train_run(config(learn_data, "optembed", budget, **options), root / name)
    return {name: root / name for name in specs}


def test_thresholds_prune_the_fields_without_signal(runs, learn_data):
    model, _ = load_run_model(runs["optembed"])
    layer = model.embedding.compressor
    signal = signal_of(DatasetMeta.load(learn_data))
    hp = layer.hyperparameters()
    t = hp["thresholds"]
    assert all(v > 0.2 for v in t.values())  # thresholds moved from 0 (in field-norm units)
    empty_t = [t[n] for n, s in signal.items() if s == 0.0]
    strong_t = [t[n] for n, s in signal.items() if s == 1.0]
    # The data holds the strong fields' thresholds down; nothing holds the empty ones'.
    assert min(empty_t) > max(strong_t), (empty_t, strong_t)
    # The supernet's own rows (the budget fill adds the next-best ones after the search).
    kept, dims = hp["supernet_kept_rows"], hp["dims"]
    sizes = {f.name: f.cardinality for f in layer.features}

    def share(names, weigh_dims):
        kept_entries = sum(kept[n] * (dims[n] if weigh_dims else DIM) for n in names)
        return kept_entries / sum(sizes[n] * DIM for n in names)

    empty = [n for n, s in signal.items() if s == 0.0]
    strong = [n for n, s in signal.items() if s == 1.0]
    assert share(empty, False) < 0.5  # fields without signal lose most rows ...
    assert share(strong, False) > share(empty, False) + 0.2  # ... strong fields far fewer
    assert share(strong, True) > share(empty, True)  # and keep more of their entries
    assert layer.memory().serve_bytes <= layer.budget_bytes


def test_retrain_keeps_the_masks_and_rewinds(runs):
    run = runs["optembed"]
    model, _ = load_run_model(run)
    layer = model.embedding.compressor
    initial = torch.load(run / "initial.pt", weights_only=True)
    w0 = initial["embedding.compressor.table.weight"]
    pruned = ~layer.row_mask
    assert pruned.any() and bool(layer.frozen)
    # Pruned rows got no gradient in the retrain from the initial weights ...
    assert torch.equal(layer.table.weight[pruned], w0[pruned])
    assert not torch.equal(layer.table.weight[~pruned], w0[~pruned])
    # ... and both masks hold in the forward pass: a pruned id reads zeros, columns past
    # a field's dim read zeros.
    names = layer.feature_names
    ids, lost = [], []
    for f in range(len(names)):
        field_pruned = torch.nonzero(pruned[layer.table.field_slice(f)]).squeeze(1)
        lost.append(len(field_pruned) > 0)
        ids.append(int(field_pruned[0]) if lost[-1] else 0)
    kjt = KeyedJaggedTensor(
        keys=names, values=torch.tensor(ids), lengths=torch.ones(len(names), dtype=torch.int64)
    )
    layer.eval()
    out = layer(kjt)[0]
    for f, d in enumerate(layer.dims.tolist()):
        assert torch.all(out[f, d:] == 0)
        assert torch.all(out[f] == 0) or not lost[f]


def test_optembed_learns(runs, learn_data):
    from json import loads

    summary = loads((runs["optembed"] / "summary.json").read_text())
    assert summary["test_auc"] > 0.66
    assert zeroed_auc(runs["optembed"], learn_data) < summary["test_auc"] - 0.04


def test_artifact_matches_serve_bytes_and_predictions(runs, learn_data, tmp_path):
    manifest = check_artifact(runs["optembed"], learn_data, tmp_path / "a", atol=1e-5)
    cfg = manifest["embedding"]["config"]
    assert any(p["form"] == "rows" for p in cfg["plans"])  # remapped fields were exported
    assert len({p["dim"] for p in cfg["plans"]}) > 1  # at mixed dims


def test_rows_only_ablation_with_int8_storage(runs, learn_data, tmp_path):
    model, _ = load_run_model(runs["rows_int8"])
    layer = model.embedding.compressor
    assert layer.dims.tolist() == [DIM] * layer.num_features
    assert (~layer.row_mask).sum() > 0
    assert layer.memory().serve_bytes <= layer.budget_bytes
    manifest = check_artifact(runs["rows_int8"], learn_data, tmp_path / "a", atol=0.05)
    assert {t["dtype"] for t in manifest["embedding"]["config"]["tables"]} == {"int8"}


def test_dims_only_ablation_keeps_every_row(runs, learn_data, tmp_path):
    model, _ = load_run_model(runs["dims"])
    layer = model.embedding.compressor
    assert bool(layer.row_mask.all()) and torch.all(layer.threshold == 0)
    assert len(set(layer.dims.tolist())) > 1
    assert layer.memory().serve_bytes <= layer.budget_bytes
    manifest = check_artifact(runs["dims"], learn_data, tmp_path / "a", atol=1e-5)
    assert manifest["embedding"]["config"]["index_map"]["remapped"] == []


def test_pruned_ids_read_a_trained_field_vector_served_as_one_more_row(runs, learn_data, tmp_path):
    run = runs["oov"]
    model, _ = load_run_model(run)
    layer = model.embedding.compressor
    assert layer.pruned_rows == "field_vector"
    initial = torch.load(run / "initial.pt", weights_only=True)["embedding.compressor.oov"]
    assert torch.all(initial == 0)  # the retrain rewound it to zero: what it holds, it learned
    plans = layer.plans()
    lost = [f for f, p in enumerate(plans) if p.form == "rows"]
    assert len(lost) >= 2
    vectors = [layer.oov.detach()[f, : plans[f].dim] for f in lost]

    # Trained where pruned ids occur in the data (a field that lost only ids the data never
    # draws keeps its zero start), and to a vector of each field's own.
    def pruned_count(f: int) -> int:
        pruned = ~layer.row_mask[layer.table.field_slice(f)]
        return int(torch.as_tensor(layer.features[f].frequencies)[pruned].sum())

    drawn = [f for f in lost if pruned_count(f) >= 100]
    assert len(drawn) >= 2 and all(vectors[lost.index(f)].abs().sum() > 0 for f in drawn)
    full = [layer.oov.detach()[f] for f in drawn]
    assert all(not torch.allclose(a, b) for i, a in enumerate(full) for b in full[i + 1 :])
    # Bytes: the kept rows, the OOV row, and the smaller remap (an array wide enough for
    # both, or the rank bitmap).
    for f in lost:
        p = plans[f]
        remap = min(remap_bytes(p.rows, p.kept + 1), bitmap_bytes(p.rows))
        assert p.oov and p.serve_bytes("fp32") == (p.kept + 1) * row_bytes(p.dim, "fp32") + remap
    manifest = check_artifact(run, learn_data, tmp_path / "a", atol=1e-5)
    tables = {t["name"]: t["rows"] for t in manifest["embedding"]["config"]["tables"]}
    assert all(tables[f"t_{plans[f].name}"] == plans[f].kept + 1 for f in lost)
    # A pruned id reads its field's vector, in the trained layer and through fbgemm.
    names = layer.feature_names
    ids = [0] * len(names)
    for f in lost:
        ids[f] = int(torch.nonzero(~layer.row_mask[layer.table.field_slice(f)])[0])
    kjt = KeyedJaggedTensor(
        keys=names, values=torch.tensor(ids), lengths=torch.ones(len(names), dtype=torch.int64)
    )
    layer.eval()
    trained = layer(kjt).view(len(names), -1)
    served = PrunedServing(layer.export())(kjt).view(len(names), -1)
    for f, v in zip(lost, vectors, strict=True):
        torch.testing.assert_close(trained[f, : len(v)], v)
        torch.testing.assert_close(served[f], trained[f])


def test_each_stage_resumes_after_a_kill(tiny_data, tmp_path):
    cfg = config(tiny_data, "optembed", "4x", epochs=0.5, generations=3, search_batches=1)
    # 8 steps a stage: killed in the supernet (step 5), in the search (after its first
    # generation) and in the retrain (step 12).
    calls = {"n": 0}
    original = RunContext.checkpoint

    def checkpoint(self, state):
        original(self, state)
        calls["n"] += 1
        if self.stage.name == "search" and calls["n"] == 1:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def kill_in_search():
        with mock.patch.object(RunContext, "checkpoint", checkpoint):
            yield

    check_resume(cfg, tmp_path, [5, kill_in_search, 12])
