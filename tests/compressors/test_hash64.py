import numpy as np
import torch

from compressors.core.hash64 import hash_bucket, mix64, salted_hash, stable_salt
from datasets.synthetic import splitmix64


def test_mix64_equals_the_unsigned_reference():
    values = np.array([0, 1, 2, 12345, 2**31, 2**40 + 7, 2**62 + 3], dtype=np.uint64)
    ours = mix64(torch.from_numpy(values.astype(np.int64))).numpy().view(np.uint64)
    np.testing.assert_array_equal(ours, splitmix64(values))


def test_salts_are_stable_and_distinct():
    assert stable_salt("C1", 0) == stable_salt("C1", 0)
    salts = {stable_salt(f"C{i}", c, s) for i in range(26) for c in range(4) for s in range(2)}
    assert len(salts) == 26 * 4 * 2
    assert all(0 <= s < 2**63 for s in salts)


def test_buckets_are_in_range_and_roughly_uniform():
    ids = torch.arange(200_000)
    rows = hash_bucket(ids, stable_salt("C1"), 100)
    assert rows.min() >= 0 and rows.max() < 100
    counts = torch.bincount(rows, minlength=100).float()
    assert counts.std() / counts.mean() < 0.05


def test_different_salts_give_independent_collisions():
    # Under one salt, ids 0..999 collide in 64 buckets; another salt must scatter them anew.
    ids = torch.arange(1000)
    a = hash_bucket(ids, stable_salt("C1"), 64)
    b = hash_bucket(ids, stable_salt("C2"), 64)
    same_a = a[:, None] == a[None, :]
    same_b = b[:, None] == b[None, :]
    both = (same_a & same_b).sum() - 1000
    expected = (same_a.sum() - 1000) / 64
    assert both < 2 * expected
    assert not torch.equal(a, b)


def test_per_value_salts_and_buckets():
    ids = torch.tensor([5, 5, 5])
    salts = torch.tensor([stable_salt("a"), stable_salt("b"), stable_salt("a")])
    h = salted_hash(ids, salts)
    assert h[0] == h[2] and h[0] != h[1]
    rows = hash_bucket(ids, salts, torch.tensor([10, 20, 30]))
    assert (rows < torch.tensor([10, 20, 30])).all()
