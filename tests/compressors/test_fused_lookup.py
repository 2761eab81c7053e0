"""The fused tables' direct kernel call equals TorchRec's FusedEmbeddingBagCollection.forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import FeatureSpec, build_compressor
from ctr.training.trainer import table_modules

FEATURES = [FeatureSpec("a", 50), FeatureSpec("b", 30), FeatureSpec("c", 7, multi_hot=True)]


def _kjt(keys: list[str]) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(1)
    lengths = {"a": [1] * 5, "b": [1] * 5, "c": [0, 2, 1, 3, 1]}
    values = {
        "a": torch.randint(0, 50, (5,), generator=g),
        "b": torch.randint(0, 30, (5,), generator=g),
        "c": torch.randint(0, 7, (7,), generator=g),
    }
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([values[k] for k in keys]),
        lengths=torch.tensor([n for k in keys for n in lengths[k]]),
    )


@pytest.mark.parametrize(
    "method,budget", [("full", "1x"), ("hash", "5x"), ("qr", "2x"), ("unified", "3x")]
)
def test_direct_lookup_matches_fused_ebc_forward_and_update(method: str, budget: str) -> None:
    direct = build_compressor(method, FEATURES, 8, budget)
    reference = copy.deepcopy(direct)
    for tables in table_modules(direct):
        tables.fuse("rowwise_adagrad", 0.1)
        assert tables._direct is not None
    for tables in table_modules(reference):
        tables.fuse("rowwise_adagrad", 0.1)
        tables._direct = None  # TorchRec's own forward
    for keys in (["a", "b", "c"], ["c", "a", "b"]):  # in kernel order, and permuted
        out, expected = direct(_kjt(keys)), reference(_kjt(keys))
        assert torch.equal(out, expected)
        (out**2).sum().backward()
        (expected**2).sum().backward()
        for mine, theirs in zip(table_modules(direct), table_modules(reference), strict=True):
            for name, weight in mine.weights().items():
                assert torch.equal(weight, theirs.weights()[name])
