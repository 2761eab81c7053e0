"""The codebook family (dpq, mgqe, dedup): exact bytes, exports that serve what trained, and
mechanism checks that fail when the mechanism is removed.

The conformance suite (``test_contract.py``) covers the contract for every registered method;
these tests check what is particular to codebooks:

* budgets at 2x/10x/100x: met exactly (``serve_bytes`` == the exported tensors' bytes) or
  refused in one line naming the method;
* codes are packed back to back at ``⌈log2 K⌉`` bits and unpack to themselves;
* DPQ learns its codes: on rows planted in clusters, the quantized rows approach the targets
  (codes frozen at their initial assignment, or one code for all rows, stay far away);
* MGQE's tail rows choose among the first ``tail_choices`` centroids only, its head is the
  globally most frequent values, and its tail codes cost fewer bits;
* Dedup merges exactly the planted near-duplicate blocks when the budget asks for that many
  merges (a similarity that ignores the entries would merge others), and serves every row
  from its representative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, FeatureSpec, build_compressor, build_serving, solve
from compressors.codebook import dedup as dedup_module
from compressors.codebook.pq import pack_codes, padded_stream, unpack_codes
from tests.helpers.table_checks import criteo_features, learning_margin

METHODS = ("dpq", "mgqe", "dedup")


def _kjt(features, ids):
    """A one-hot KJT: ``ids[f]`` are field ``f``'s values (one per sample)."""
    return KeyedJaggedTensor(
        keys=[f.name for f in features],
        values=torch.cat(ids),
        lengths=torch.ones(sum(len(i) for i in ids), dtype=torch.int32),
    )


def _export_ready(method):
    if method.name == "dedup":
        method.apply_dedup()
    return method.eval()


# ---------------------------------------------------------------- bytes
@pytest.mark.parametrize("budget", ["2x", "10x", "100x"])
@pytest.mark.parametrize("name", METHODS)
def test_budget_is_met_exactly_by_the_export_or_refused_in_one_line(name, budget):
    features = criteo_features(0.002, zipf=True)
    try:
        plan = solve(name, features, 16, budget)
    except BudgetError as e:
        assert str(e).startswith(f"{name}:") and "\n" not in str(e)
        return
    method = _export_ready(build_compressor(name, features, 16, budget))
    exported = method.export()
    assert exported.nbytes == plan.serve_bytes == method.memory().serve_bytes
    assert plan.serve_bytes <= plan.budget_bytes
    assert sum(plan.parts.values()) == plan.serve_bytes


def test_dpq_reaches_100x_at_dim_16_and_mgqe_refuses_it_naming_its_codebook():
    features = criteo_features(0.01)
    plan = solve("dpq", features, 16, "100x")
    assert plan.ratio >= 100
    with pytest.raises(BudgetError, match="mgqe: the smallest codes"):
        solve("mgqe", features, 16, "1000x")


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_pack_back_to_back_and_unpack_to_themselves(bits):
    codes = torch.randint(0, 1 << bits, (101, 3), generator=torch.Generator().manual_seed(bits))
    stream = pack_codes(codes, bits)
    assert stream.numel() == -(-101 * 3 * bits // 8)
    index = torch.arange(303).view(101, 3)
    assert torch.equal(unpack_codes(padded_stream(stream), index, bits), codes)


@pytest.mark.parametrize("options", [{}, {"mode": "sx"}, {"codebooks": "field"}])
@pytest.mark.parametrize("name", ["dpq", "mgqe"])
def test_served_codes_and_values_equal_the_model_in_eval_mode(name, options):
    features = criteo_features(0.001, zipf=True)[:6]
    method = build_compressor(name, features, 8, "2x", **options).eval()
    for dtype in ("fp32", "fp16"):
        method.set_storage(dtype)
        exported = method.export()
        assert exported.nbytes == method.memory().serve_bytes
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, f.cardinality, (64,), generator=g) for f in features]
        kjt = _kjt(features, ids)
        torch.testing.assert_close(build_serving(exported)(kjt), method(kjt), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=f"{name}: --storage int8 refused"):
        method.set_storage("int8")


# ---------------------------------------------------------------- DPQ learns its codes
def _fit_planted(method, steps=300, seed=0):
    """Fits the method's output to rows planted in 16 clusters per sub-space; returns the
    eval-mode mean squared error relative to the targets' variance."""
    n, dim, parts = 512, method.dim, method.plan_.parts
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(parts, 16, dim // parts, generator=g)
    assign = torch.randint(0, 16, (n, parts), generator=g)
    target = centers[torch.arange(parts), assign].reshape(n, dim)
    features = method.features
    kjt = _kjt(features, [torch.arange(n)])
    params = list(method.parameters())
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        out = method(kjt).view(n, dim)
        (torch.nn.functional.mse_loss(out, target) + method.penalty()).backward()
        opt.step()
    method.eval()
    with torch.no_grad():
        error = torch.nn.functional.mse_loss(method(kjt).view(n, dim), target)
    return float(error / target.var())


# Relative error after fitting (measured: vq .07, sx .33; codes frozen at their initial
# assignment .96/.94, one code for all rows .97/.96). sx stays higher: in a 2-dim sub-space
# an argmax of dot products only ever picks keys on the convex hull of the keys.
PLANTED_ERROR = {"vq": 0.15, "sx": 0.5}
USED_CODES = {"vq": 12, "sx": 4}  # of 16 per sub-space


@pytest.mark.parametrize("mode", ["vq", "sx"])
def test_dpq_learns_codes_that_reconstruct_planted_clusters(mode):
    torch.manual_seed(0)
    features = [FeatureSpec("f", 512)]
    method = build_compressor("dpq", features, 4, "2x", parts=2, choices=16, mode=mode)
    before = method.quantizer.all_codes()[0].clone()
    error = _fit_planted(method)
    after = method.quantizer.all_codes()[0]
    assert error < PLANTED_ERROR[mode], error
    assert (after != before).any(1).float().mean() > 0.5  # the codes moved
    assert all(len(torch.unique(after[:, p])) >= USED_CODES[mode] for p in range(2))


@pytest.mark.parametrize(
    "method,options",
    [
        ("dpq", {"mode": "vq"}),
        ("dpq", {"mode": "sx", "batch_norm": False}),
        ("mgqe", {"mode": "vq"}),
        ("mgqe", {"mode": "vq", "codebooks": "field"}),
        ("mgqe", {"mode": "sx", "batch_norm": False}),
    ],
)
def test_codes_equal_the_masked_full_scores_argmax(method, options, monkeypatch):
    # Codes are computed without gradients in place, tier by tier (a tail row against its
    # own centroids only) and in small chunks: the same argmax as every row scored against
    # all the head's centroids with the tail's extra choices masked out.
    import compressors.codebook.pq as pq

    monkeypatch.setattr(pq, "SCORE_ENTRIES", 300)
    monkeypatch.setattr(pq, "ASSIGN_CHUNK", 77)
    torch.manual_seed(0)
    feats = [
        FeatureSpec("a", 400, frequencies=np.arange(400, 0, -1).astype(float)),
        FeatureSpec("b", 300, frequencies=np.arange(300, 0, -1).astype(float)),
    ]
    extra = {"head_choices": 16, "tail_choices": 4} if method == "mgqe" else {"choices": 16}
    layer = build_compressor(method, feats, 8, "2x", parts=4, **extra, **options)
    q = layer.quantizer
    with torch.no_grad():
        q.keys.normal_(0, 0.01)
        q.query.weights()[pq.QUERY_TABLE].normal_(0, 0.01)
    weight = q.query.weights()[pq.QUERY_TABLE].detach()
    fields = torch.repeat_interleave(torch.arange(2), torch.tensor([400, 300]))
    ids = torch.arange(700) - q._offsets[fields]
    want = q.scores(weight, ids, fields).argmax(-1)  # the whole table, masked, with autograd
    for training in (True, False):
        q.train(training)
        assert torch.equal(q.codes(weight, ids, fields), want)
    codes = torch.cat(q.all_codes()) if len(q.plan.choices) == 1 else None
    if codes is None:
        head, tail = q.all_codes()
        is_tail = ids >= torch.tensor(q.plan.heads)[fields]
        assert torch.equal(head.long(), want[~is_tail]) and torch.equal(tail.long(), want[is_tail])
        assert int(tail.max()) < 4
    else:
        assert torch.equal(codes.long(), want)


# ---------------------------------------------------------------- MGQE
def test_mgqe_head_is_the_globally_most_frequent_values_and_tail_codes_are_shorter():
    # Field "hot" is frequent throughout, "cold" rare: the global top 10% is all in "hot".
    hot = np.linspace(1000, 500, 300).round()
    cold = np.linspace(20, 1, 700).round()
    features = [
        FeatureSpec("hot", 300, frequencies=hot),
        FeatureSpec("cold", 700, frequencies=cold),
    ]
    method = build_compressor("mgqe", features, 8, "2x", parts=4)
    plan = method.plan_
    assert plan.heads == (100, 0) and plan.choices == (256, 64)
    assert plan.parts_bytes()["codes.0"] == 100 * 4 * 8 // 8
    assert plan.parts_bytes()["codes.1"] == 900 * 4 * 6 // 8
    head, tail = method.quantizer.all_codes()
    assert head.shape == (100, 4) and tail.shape == (900, 4)
    assert int(tail.max()) < 64 <= int(head.max())  # the tail chooses among the first 64


def test_mgqe_tail_rows_use_only_their_centroids_after_training():
    features = [FeatureSpec("f", 512, frequencies=np.arange(512, 0, -1).astype(float))]
    method = build_compressor(
        "mgqe", features, 4, "2x", parts=2, head_choices=16, tail_choices=4, head_share=0.25
    )
    _fit_planted(method, steps=100)
    head, tail = method.quantizer.all_codes()
    assert len(head) == 128 and int(tail.max()) < 4 and int(head.max()) >= 4


# ---------------------------------------------------------------- Dedup
def _planted_blocks(pairs=10, singles=20, entries=64, seed=0):
    rng = np.random.default_rng(seed)
    blocks = rng.normal(0, 0.1, (2 * pairs + singles, entries)).astype(np.float32)
    partner = {}
    for k in range(pairs):
        a, b = 2 * k, 2 * k + 1
        blocks[b] = blocks[a] + rng.normal(0, 1e-4, entries)
        partner[a], partner[b] = b, a
    last = rng.normal(0, 0.1, (1, entries)).astype(np.float32)  # the never-merged last block
    return np.concatenate([blocks, last]), partner


def test_dedup_merges_exactly_the_planted_near_duplicates():
    blocks, partner = _planted_blocks()
    rep, report = dedup_module.deduplicate(
        blocks, len(blocks) - len(partner) // 2, 0.01, 0.7, 8, 16, 2, 0.5, 0
    )
    merged = [i for i in range(len(blocks)) if rep[i] != i]
    assert len(merged) == len(partner) // 2 and report["neighbour_merges"] == 0
    assert all(rep[i] == partner[i] for i in merged), (merged, rep)
    assert report["fp"] == 0.01 and report["min_sim"] == 1.0


def _merges_pair_by_pair(pairs, rep, absorbed, limit, chain):
    # The rule, one pair at a time (what dedup ran before its passes were vectorised).
    taken = []
    for k, (i, j) in enumerate(pairs.tolist()):
        if len(taken) >= limit:
            break
        if rep[i] != i or rep[j] != j:
            continue
        if absorbed[i]:
            if absorbed[j] and not chain:
                continue
            i, j = j, i
        rep[i] = j
        absorbed[j] = True
        taken.append(k)
    return np.array(taken, dtype=np.int64)


@pytest.mark.parametrize("chain", [False, True])
def test_dedup_vectorised_merge_passes_equal_the_pair_by_pair_rule(chain):
    rng = np.random.default_rng(0)
    for trial in range(150):
        n = int(rng.integers(2, 60))
        pairs = np.sort(rng.integers(0, n, (int(rng.integers(0, 4 * n)), 2)), axis=1)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        rep = np.arange(n)
        absorbed = np.zeros(n, dtype=bool)
        for i, j in np.sort(rng.integers(0, n, (n // 4, 2)), axis=1):  # a state mid-way
            if i != j and rep[i] == i and rep[j] == j and not absorbed[i]:
                rep[i], absorbed[j] = j, True
        limit = int(rng.integers(0, n + 1))
        want_rep, want_abs = rep.copy(), absorbed.copy()
        want = _merges_pair_by_pair(pairs, want_rep, want_abs, limit, chain)
        got = dedup_module.greedy_merges(pairs, rep, absorbed, limit, chain=chain)
        assert np.array_equal(got, want), trial
        assert np.array_equal(rep, want_rep) and np.array_equal(absorbed, want_abs), trial


def test_dedup_lsh_pairs_are_the_distinct_sorted_pairs():
    blocks = np.random.default_rng(0).normal(0, 0.01, (300, 8)).astype(np.float32)
    pairs = dedup_module.lsh_pairs(blocks, 4, 2, 0.5, np.random.default_rng(1))
    assert len(pairs) and (pairs[:, 0] < pairs[:, 1]).all()
    assert np.array_equal(pairs, np.unique(pairs, axis=0))


def test_dedup_serves_every_row_from_its_representative_block():
    features = [FeatureSpec("a", 300), FeatureSpec("b", 340)]  # 640 rows: 40 blocks of 16
    method = build_compressor("dedup", features, 4, "1.5x", block_rows=16)
    blocks, partner = _planted_blocks(pairs=15, singles=9, entries=16 * 4)
    with torch.no_grad():
        method.tables.weights()["blocks"].copy_(torch.from_numpy(blocks).reshape(-1, 4))
    method.apply_dedup()
    method.eval()
    exported = method.export()
    assert exported.nbytes == method.memory().serve_bytes <= method.budget_bytes
    rep = method.index_map.remap.long()
    merged = torch.nonzero(rep != torch.arange(len(rep))).flatten().tolist()
    assert merged and all(int(rep[i]) == partner[i] for i in merged)
    ids = [torch.arange(300), torch.arange(300) % 340]
    kjt = _kjt(features, ids)
    served = build_serving(exported)(kjt)
    torch.testing.assert_close(served, method(kjt), rtol=0, atol=0)
    rows = torch.cat([ids[0], ids[1] + 300])
    expected = torch.from_numpy(blocks).reshape(-1, 4)[rep[rows // 16] * 16 + rows % 16]
    torch.testing.assert_close(served.transpose(0, 1).reshape(-1, 4), expected)


# ---------------------------------------------------------------- learning on CTR data
# A short DeepFM run's test AUC minus the same model's with the embedding output zeroed must
# exceed the margin (the dense features alone reach ~.53-.59); a run whose embedding outputs
# zeros while it trains must not (so the check cannot pass vacuously).
LEARNING = {"dpq": ("10x", {}), "mgqe": ("4x", {}), "dedup": ("2x", {})}
LEARNING_MARGIN = 0.05


@pytest.mark.parametrize("name", LEARNING)
def test_learns_beyond_its_ablation_and_the_check_can_fail(name, learn_data):
    budget, options = LEARNING[name]
    learned, ablated = learning_margin(learn_data, name, budget, epochs=0.1, **options)
    assert learned - ablated > LEARNING_MARGIN, (name, learned, ablated)
    learned, ablated = learning_margin(
        learn_data, name, budget, mutate=True, epochs=0.02, **options
    )
    assert not learned - ablated > LEARNING_MARGIN, (name, learned, ablated)


@pytest.mark.parametrize(("parts", "choices"), [(16, 256), (16, 32), (12, 256)])
def test_rows_of_more_than_64_code_bits_serve_exactly(parts, choices):
    features = criteo_features(0.001)[:4]
    dim = 16 if parts != 12 else 24
    method = build_compressor("dpq", features, dim, "1x", parts=parts, choices=choices).eval()
    g = torch.Generator().manual_seed(1)
    kjt = _kjt(features, [torch.randint(0, f.cardinality, (50,), generator=g) for f in features])
    served = build_serving(method.export())
    assert served.words > 1
    torch.testing.assert_close(served(kjt), method(kjt), rtol=0, atol=1e-6)
