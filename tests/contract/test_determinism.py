"""Every registered method's training step is bitwise reproducible with two threads.

Exact resume (a killed run continues to the uninterrupted run's weights) and seeded sweeps
rest on it. On CPU, advanced indexing's backward (``x[index]`` with repeated indices) adds
the repeats' gradients in parallel in thread order, so a gather of a batch's values from
its unique rows, of codes from a codebook or of fields from per-field parameters differs in
its last bits from one run to the next once the batch is large enough to be split across
threads; ``compressors.core.hybrid.take_rows`` is the ordered gather.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, available, build_compressor
from compressors.core.hybrid import take_rows
from tests.helpers.features import criteo_features

# Values x dim well above at::internal::GRAIN_SIZE (32768): the backward runs in parallel.
BATCH = 2048
DIM = 8
REPEATS = 3


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _batch(features, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A skewed draw (most values from the first rows) repeats indices as real batches do.
    values = torch.cat(
        [
            (torch.rand(BATCH, generator=g).pow(3) * f.cardinality)
            .long()
            .clamp(max=f.cardinality - 1)
            for f in features
        ]
    )
    lengths = torch.ones(BATCH * len(features), dtype=torch.int32)
    return KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths)


def _gradients(pristine, kjt):
    # A fresh copy and seed each time: a training forward may move the method's state
    # (running scales, anneal counters) or draw noise (Gumbel).
    layer = copy.deepcopy(pristine)
    torch.manual_seed(0)
    out = layer(kjt)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    # A sparse gradient (pep's thresholds: the rows a batch read) compares as its dense form.
    return {
        n: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
        for n, p in layer.named_parameters()
        if p.grad is not None
    }


@pytest.mark.parametrize("name", available())
def test_a_training_step_gives_the_same_gradients_every_time(name, two_threads):
    features = criteo_features()
    layer = None
    for budget in ("5x", "2x", "1x"):
        try:
            layer = build_compressor(name, features, DIM, budget)
            break
        except BudgetError:
            continue
    assert layer is not None, f"{name} fits none of 5x, 2x, 1x"
    layer.train()
    kjt = _batch(features)
    first = _gradients(layer, kjt)
    for _ in range(REPEATS - 1):
        again = _gradients(layer, kjt)
        assert again.keys() == first.keys()
        for k in first:
            assert torch.equal(first[k], again[k]), f"{name}: gradient of {k} differs between runs"


def test_take_rows_is_indexing_with_an_ordered_backward(two_threads):
    source = torch.randn(1000, 4, requires_grad=True)
    index = (torch.rand(50_000, 3).pow(3) * 1000).long()
    assert torch.equal(take_rows(source, index), source[index])
    weights = torch.randn(50_000, 3, 4)
    grads = []
    for _ in range(REPEATS):
        source.grad = None
        (take_rows(source, index) * weights).sum().backward()
        grads.append(source.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    source.grad = None
    (source[index] * weights).sum().backward()
    # The same sums in another order (the heaviest rows add up thousands of terms).
    torch.testing.assert_close(source.grad, grads[0], rtol=1e-4, atol=1e-3)
