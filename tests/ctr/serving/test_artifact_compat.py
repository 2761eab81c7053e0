"""Artifacts exported by an earlier version still load and predict the same numbers."""

import json

import pytest
import torch
from torchrec import KeyedJaggedTensor

from ctr.serving.compact import CompactModel
from tests.helpers import FIXTURES as ALL_FIXTURES

FIXTURES = ALL_FIXTURES / "artifacts"


@pytest.mark.parametrize("name", ["full-fp32", "hash-int8"])
def test_old_artifact_loads_and_predicts_the_same(name):
    expected = json.loads((FIXTURES / "expected.json").read_text())
    ids = expected["ids"]
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=list(ids),
        values=torch.tensor([v for values in ids.values() for v in values]),
        lengths=torch.ones(sum(len(v) for v in ids.values()), dtype=torch.int32),
    )
    model = CompactModel.load(FIXTURES / name)
    logits = model(torch.tensor(expected["dense"]), sparse)
    torch.testing.assert_close(logits, torch.tensor(expected[name]), rtol=0, atol=1e-6)
