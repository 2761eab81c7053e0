"""The shared engine pieces: column helpers, counting, lookup, splits, prefetching."""

from __future__ import annotations

import itertools
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from datasets.prepare.columns import (
    Issues,
    as_strings,
    log_square_buckets,
    parse_numbers,
    token_lists,
)
from datasets.prepare.sources import prefetch
from datasets.prepare.splits import global_ranges, random_split
from datasets.prepare.vocab import ValueCounter, build_vocab


def test_parse_numbers_flags_each_bad_row_once_under_its_first_reason():
    issues = Issues(6)
    x = parse_numbers(pa.array(["1", "", "-2.5", "1e3", "x1", "inf"]), "I1", issues)
    np.testing.assert_array_equal(x, [1.0, np.nan, -2.5, 1000.0, np.nan, np.nan])
    issues.flag("bad_label", "label", np.array([0, 0, 0, 0, 1, 1], dtype=bool))
    first = issues.first_reasons()
    # "" is missing, not bad; rows 4 and 5 are not counted again as bad_label.
    assert [(f.reason, f.mask.nonzero()[0].tolist()) for f in first] == [("bad_number", [4, 5])]


def test_log_square_buckets_match_the_standard_rule():
    x = np.array([np.nan, -3.0, 0.0, 2.0, 3.0, 10.0, 1000.0])
    assert log_square_buckets(x).to_pylist() == [None, "-3", "0", "2", "1", "5", "47"]


def test_token_lists_drop_empty_tokens_and_keep_lists():
    joined = token_lists(pa.array(["a|b", "", None, "c||d"]), "|")
    assert joined.to_pylist() == [["a", "b"], [], [], ["c", "d"]]
    lists = token_lists(pa.array([["x", ""], None], pa.list_(pa.string())), None)
    assert lists.to_pylist() == [["x"], []]


def test_as_strings_formats_whole_floats_like_integers():
    assert as_strings(pa.array([3.0, 2.5, None])).to_pylist() == ["3", "2.5", None]
    assert as_strings(pa.array([7, None])).to_pylist() == ["7", None]
    assert as_strings(pa.array(["a", ""])).to_pylist() == ["a", None]


def test_value_counter_merges_chunks_exactly(monkeypatch):
    monkeypatch.setattr(ValueCounter, "MERGE_ROWS", 3)  # merge after nearly every chunk
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 40, 50).astype(str).tolist() + [None] for _ in range(20)]
    counter = ValueCounter()
    for c in chunks:
        counter.add(pa.array(c))
    values, counts = counter.result()
    expected = Counter(v for c in chunks for v in c if v is not None)
    assert values.to_pylist() == sorted(expected)
    assert counts.tolist() == [expected[v] for v in sorted(expected)]
    assert counter.missing == 20


def test_vocab_ids_descend_in_frequency_and_fold_rare_and_missing_into_0():
    counter = ValueCounter()
    counter.add(pa.array(["b", "a", "b", "c", "a", "b", None, "d"]))
    vocab, frequencies, distinct = build_vocab(counter, min_count=2)
    assert vocab.values.to_pylist() == ["b", "a"]
    assert frequencies.tolist() == [3, 3, 2]  # OOV = c + d + one missing
    assert distinct == 4
    assert vocab.lookup(pa.array(["a", "zzz", None, "b"])).to_pylist() == [2, 0, 0, 1]
    bags = pa.array([["b", "c"], [], ["a"]], pa.list_(pa.string())).slice(1)
    assert vocab.lookup(bags).to_pylist() == [[], [2]]


def test_random_split_is_deterministic_and_close_to_its_fractions():
    plan = random_split(seed=5, fractions=(0.7, 0.2, 0.1))
    codes = plan.assign(0, np.arange(100_000))
    np.testing.assert_array_equal(codes, plan.assign(0, np.arange(100_000)))
    np.testing.assert_allclose(np.bincount(codes) / len(codes), [0.7, 0.2, 0.1], atol=0.01)
    assert (codes != plan.assign(1, np.arange(100_000))).mean() > 0.3  # sources differ


def test_global_ranges_cut_across_sources():
    plan = global_ranges([4, 4, 4], [(0, 6, "train"), (6, 9, "valid"), (9, 12, "test")], "x")
    assert [plan.assign(s, np.arange(4)).tolist() for s in range(3)] == [
        [0, 0, 0, 0],
        [0, 0, 1, 1],
        [1, 2, 2, 2],
    ]
    assert plan.end(1, "train") == 2 and not plan.uses(2, "train")


def test_prefetch_passes_errors_and_stops_when_abandoned():
    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(failing()))
    before = threading.active_count()
    endless = prefetch(itertools.count(), depth=1)
    assert next(endless) == 0
    endless.close()  # must not hang on the producer blocked on a full queue
    assert threading.active_count() <= before
