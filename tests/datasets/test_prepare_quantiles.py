"""The train-split sketch behind numeric buckets: bounded memory, equal-frequency edges,
a bucket of its own for 0 only when 0 is the most frequent value."""

from __future__ import annotations

import numpy as np

from datasets.readers.quantiles import ZERO_TOKEN, NumericSketch


def _fed(values: np.ndarray, size: int = 4096, chunk: int = 10_000) -> NumericSketch:
    sketch = NumericSketch(seed="x", size=size)
    for start in range(0, len(values), chunk):
        sketch.add(values[start : start + chunk])
    return sketch


def test_a_large_stream_keeps_a_fixed_sample_and_near_exact_quantiles():
    x = np.random.default_rng(0).lognormal(3.0, 1.5, 200_000)
    sketch = _fed(x)
    assert len(sketch.sample) == 4096 and sketch.nonzeros == len(x)
    edges = np.array(sketch.fit(10).edges)
    ranks = np.searchsorted(np.sort(x), edges) / len(x)
    # A 4096-value uniform sample: rank error ~ sqrt(q(1-q)/4096) <= 0.8%; allow 3%.
    np.testing.assert_allclose(ranks, np.arange(1, 10) / 10, atol=0.03)
    tokens = sketch.fit(10).tokens(x).to_pylist()
    shares = np.unique(tokens, return_counts=True)[1] / len(x)
    assert len(shares) == 10 and shares.min() > 0.07 and shares.max() < 0.13


def test_the_sample_is_uniform_over_the_stream():
    # Later chunks must not dominate: the stream is sorted, so its order shows in the sample.
    x = np.arange(1, 100_001, dtype=np.float64)
    sample = _fed(x, size=2048).sample
    assert abs(np.median(sample) - 50_000) < 3_000


def test_a_zero_inflated_column_gets_a_zero_bucket_and_quantiles_of_its_non_zeros():
    rng = np.random.default_rng(1)
    gain = np.where(rng.random(50_000) < 0.9, 0.0, rng.lognormal(8, 1, 50_000))
    buckets = _fed(gain).fit(4)
    assert buckets.zero_bucket and buckets.order[0] == ZERO_TOKEN
    nonzero = np.sort(gain[gain > 0])
    ranks = np.searchsorted(nonzero, buckets.edges) / len(nonzero)
    np.testing.assert_allclose(ranks, [0.25, 0.5, 0.75], atol=0.04)
    assert buckets.tokens(np.array([0.0, np.nan])).to_pylist() == [ZERO_TOKEN, None]


def test_zero_is_an_ordinary_value_when_it_is_not_the_mode():
    rng = np.random.default_rng(2)
    # 400 zeros; the most frequent value, 50, occurs ~800 times.
    x = np.concatenate([np.zeros(400), rng.normal(50, 10, 20_000).round()])
    buckets = _fed(x).fit(4)
    assert not buckets.zero_bucket
    ranks = np.searchsorted(np.sort(x), buckets.edges) / len(x)
    np.testing.assert_allclose(ranks, [0.25, 0.5, 0.75], atol=0.04)


def test_ties_merge_edges_and_the_sketch_is_reproducible():
    hours = np.array([40.0] * 60 + [20.0] * 20 + [50.0] * 20)
    buckets = _fed(hours).fit(10)
    assert buckets.edges == (40.0, 50.0)  # one bucket per distinct value, not ten
    assert buckets.order[0] == "[40.0,50.0)"  # the most frequent bucket gets id 1
    again = _fed(np.random.default_rng(3).normal(size=30_000), size=1024)
    once = _fed(np.random.default_rng(3).normal(size=30_000), size=1024)
    assert again.fit(8) == once.fit(8)
