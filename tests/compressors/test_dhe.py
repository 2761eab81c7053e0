"""DHE specifics: the dense hash encoding, salts, the network solver, dedup, exported BN."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, FeatureSpec, build_compressor, build_serving
from compressors.core.hash64 import mix64, salted_hash, stable_salt
from compressors.hashing.dhe import (
    ACTIVATION_BATCH,
    DeepHashEmbedding,
    network_params,
    solve_network,
)
from tests.helpers.features import criteo_features

MASK64 = (1 << 64) - 1


def test_codes_are_universal_hashes_of_the_salted_value():
    seed = 5
    dhe = DeepHashEmbedding(["A", "B"], 16, hashes=8, width=4, layers=1, seed=seed)
    values = torch.tensor([0, 1, 99, 123456789])
    codes = dhe.codes(values, torch.tensor([1, 1, 0, 1]))
    for n, (v, f) in enumerate(zip(values.tolist(), "BBAB", strict=True)):
        x = salted_hash(torch.tensor(v), stable_salt(f, 0, seed)).item()
        for i in range(8):
            a = (mix64(torch.tensor(stable_salt("dhe-a", i, seed))).item() | 1) & MASK64
            b = mix64(torch.tensor(stable_salt("dhe-b", i, seed))).item() & MASK64
            assert codes[n, i].item() == ((a * x + b) & MASK64) >> 44


def test_uniform_encoding_is_deterministic_and_fills_minus_one_to_one():
    ids = torch.arange(5000)
    fields = torch.zeros_like(ids)
    first = DeepHashEmbedding(["A"], 16, 256, 8, 1).encode(ids, fields)
    again = DeepHashEmbedding(["A"], 16, 256, 8, 1).encode(ids, fields)
    assert torch.equal(first, again)
    assert first.min() >= -1.0 and first.max() <= 1.0
    assert first.mean().item() == pytest.approx(0.0, abs=0.01)
    assert first.std().item() == pytest.approx(3**-0.5, rel=0.02)  # uniform on [-1, 1]
    assert len(torch.unique(first, dim=0)) == len(ids)  # every value gets its own code


def test_gaussian_encoding_is_standard_normal():
    ids = torch.arange(4000)
    enc = DeepHashEmbedding(["A"], 16, 128, 8, 1, transform="gaussian").encode(
        ids, torch.zeros_like(ids)
    )
    assert torch.isfinite(enc).all()
    assert enc.mean().item() == pytest.approx(0.0, abs=0.01)
    assert enc.std().item() == pytest.approx(1.0, rel=0.02)


def test_salts_are_independent_across_features():
    ids = torch.arange(3000)
    dhe = DeepHashEmbedding(["A", "B"], 16, 128, 8, 1)
    a = dhe.encode(ids, torch.zeros_like(ids)).flatten()
    b = dhe.encode(ids, torch.ones_like(ids)).flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 0.01
    assert (a == b).float().mean() < 0.001


def test_forward_embeds_each_distinct_value_once_and_pools():
    torch.manual_seed(0)
    dhe = DeepHashEmbedding(["A", "B"], 8, 64, 16, 2).eval()
    kjt = KeyedJaggedTensor(
        keys=["A", "B"], values=torch.tensor([3, 3, 9, 3, 3, 4]), lengths=torch.tensor([2, 1, 2, 1])
    )  # A: [3,3],[9]; B: [3,3],[4]
    seen = []
    dhe.network.register_forward_hook(lambda _m, inputs, _out: seen.append(len(inputs[0])))
    out = dhe(kjt)
    assert seen == [4]  # (A,3), (A,9), (B,3), (B,4)
    with torch.no_grad():
        rows = dhe.network(dhe.encode(torch.tensor([3, 9, 3, 4]), torch.tensor([0, 0, 1, 1])))
    torch.testing.assert_close(out[0, 0], 2 * rows[0])
    torch.testing.assert_close(out[1, 0], rows[1])
    torch.testing.assert_close(out[0, 1], 2 * rows[2])
    torch.testing.assert_close(out[1, 1], rows[3])
    assert not torch.allclose(rows[0], rows[2])  # same id, different field


@pytest.mark.parametrize("per_field", [False, True])
def test_forward_takes_any_int64_key(per_field):
    """Raw-value fingerprints span all of int64: each (field, value) is still embedded as
    its own encoding, once per batch (keys='fingerprint' serves DHE without a vocabulary)."""
    torch.manual_seed(0)
    dhe = DeepHashEmbedding(["A", "B"], 8, 64, 16, 2, per_field=per_field).eval()
    big = [2**62 + 3, -(2**63) + 7, 2**62 + 3, -5]
    kjt = KeyedJaggedTensor(
        keys=["A", "B"], values=torch.tensor(big), lengths=torch.tensor([1, 1, 1, 1])
    )
    out = dhe(kjt)
    with torch.no_grad():
        for i, (v, f) in enumerate(zip(big, [0, 0, 1, 1], strict=True)):
            net = dhe.networks[f] if per_field else dhe.network
            row = net(dhe.encode(torch.tensor([v]), torch.tensor([f])))[0]
            torch.testing.assert_close(out[i % 2, f], row)
    assert not torch.allclose(out[0, 0], out[0, 1])  # same value, different field


def test_solver_prefers_many_hashes_then_width():
    assert solve_network(1024, 32, 16, 512, 2, 16, budget_floats=10**7) == (1024, 512)
    k, w = solve_network(1024, 32, 16, 512, 2, 16, budget_floats=200_000)
    assert k == 1024 and network_params(k, w, 2, 16) <= 200_000
    assert network_params(k, w + 1, 2, 16) > 200_000
    k, w = solve_network(1024, 32, 16, 512, 2, 16, budget_floats=5_000)
    assert (k, w) == (256, 16)  # 1024 and 512 hashes cannot reach width 16
    assert solve_network(1024, 32, 16, 512, 2, 16, budget_floats=100) is None
    hyper = build_compressor("dhe", criteo_features(), 16, "10x").hyperparameters()
    assert hyper["hashes"] == 1024 and hyper["width"] > 300


def test_batchnorm_statistics_are_exported_and_counted():
    layer = build_compressor("dhe", [FeatureSpec("big", 50_000), FeatureSpec("s", 9)], 16, "50x")
    m = layer.module
    exported = layer.export().tensors
    running = [k for k in exported if k.endswith(("running_mean", "running_var"))]
    assert len(running) == 2 * m.layers
    assert not any(k.endswith("num_batches_tracked") for k in exported)
    assert layer.memory().parts["dhe"] == 4 * network_params(m.hashes, m.width, m.layers, 16)


def test_a_batch_of_empty_bags_embeds_to_zeros_in_training():
    dhe = DeepHashEmbedding(["A", "B"], 8, 16, 8, 2).train()
    kjt = KeyedJaggedTensor(
        keys=["A", "B"],
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(6, dtype=torch.int64),
    )
    assert torch.equal(dhe(kjt), torch.zeros(3, 2, 8))


def test_per_field_networks_are_the_reference_setting():
    features = criteo_features()
    layer = build_compressor("dhe", features, 16, "10x", networks="per_field")
    m = layer.module
    assert m.per_field and len(m.networks) == len(m.fields) > 1
    assert layer.hyperparameters()["networks"] == "per_field"
    assert layer.memory().serve_bytes == layer.export().nbytes <= layer.budget_bytes
    # Each field has its own network: the same id of two fields goes through different ones.
    kjt = KeyedJaggedTensor(
        keys=layer.feature_names,
        values=torch.ones(len(features), dtype=torch.int64),
        lengths=torch.ones(len(features), dtype=torch.int64),
    )
    layer.eval()
    out = layer(kjt)
    with torch.no_grad():
        first = m.fields.index(m.fields[0])
        code = m.encode(torch.tensor([1]), torch.tensor([first]))
        expected = m.networks[first](code)[0]
    torch.testing.assert_close(out[0, layer.feature_names.index(m.fields[0])], expected)
    served = build_serving(layer.export())(kjt)
    torch.testing.assert_close(served, out)


def test_solver_refuses_far_below_the_papers_hash_count():
    features = [FeatureSpec("big", 50_000)]
    budget = 8_000  # 64 hashes at width 16 fit (6.8 kB), 128 do not (10.9 kB)
    with pytest.raises(BudgetError, match="fewer than min_hashes=128 hashes would be far"):
        build_compressor("dhe", features, 16, budget)
    assert build_compressor("dhe", features, 16, budget, min_hashes=32).module.hashes == 64
    per_field = build_compressor("dhe", criteo_features(), 16, "100x", networks="per_field")
    assert 128 <= per_field.module.hashes < 1024  # the budget split over the fields


def test_train_bytes_include_the_batch_activations():
    layer = build_compressor("dhe", criteo_features(), 16, "100x")
    m = layer.module
    distinct = ACTIVATION_BATCH * len(m.fields)
    encodings = distinct * m.hashes * 4
    assert m.activation_bytes() >= encodings
    assert layer.memory().train_bytes >= encodings + 3 * layer.memory().serve_bytes
    assert layer.memory().train_bytes > 10 * layer.memory().serve_bytes  # not compressed
