"""ROBE-Z specifics: chunk offsets and signs, wrap-around, salts, array sizing, memory."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import FeatureSpec, build_compressor
from compressors.core.hash64 import salted_hash, stable_salt
from compressors.core.storage import TableSpec
from compressors.hashing.robe import SIGN_TAG, RobeArray


def test_chunks_read_the_intended_offsets_with_signs():
    size, chunk, seed = 1009, 4, 3
    robe = RobeArray(["A", "B"], 16, size, chunk, seed)
    with torch.no_grad():
        robe.array.copy_(torch.arange(size, dtype=torch.float32))
    values = torch.tensor([0, 5, 123456, 7])
    fields = torch.tensor([0, 1, 0, 1])
    index, signs = robe.locate(values, fields)
    for n, (v, f) in enumerate(zip(values.tolist(), ["A", "B", "A", "B"], strict=True)):
        for c in range(16 // chunk):
            start = salted_hash(torch.tensor(v), stable_salt(f, c, seed)).item() % size
            bits = salted_hash(torch.tensor(v), stable_salt(SIGN_TAG + f, c, seed)).item()
            for j in range(chunk):
                assert index[n, c * chunk + j].item() == (start + j) % size
                assert signs[n, c * chunk + j].item() == (-1.0 if (bits >> j) & 1 else 1.0)
    kjt = KeyedJaggedTensor(
        keys=["A", "B"],
        values=torch.tensor([0, 123456, 5, 7]),
        lengths=torch.ones(4, dtype=torch.int64),
    )
    out = robe(kjt)  # [2 samples, 2 fields, 16]
    torch.testing.assert_close(out[1, 0], index[2].float() * signs[2])
    torch.testing.assert_close(out[0, 1], index[1].float() * signs[1])


def test_chunks_wrap_around_the_end_of_the_array():
    robe = RobeArray(["A"], 16, size=17, chunk=16)  # every chunk but one wraps
    index, _ = robe.locate(torch.arange(200), torch.zeros(200, dtype=torch.int64))
    assert int(index.max()) < 17
    starts = index[:, 0]
    assert bool((starts > 1).any())  # unaligned offsets, not multiples of the chunk
    torch.testing.assert_close(index, (starts.unsqueeze(1) + torch.arange(16)) % 17)


def test_salts_are_independent_across_features_and_chunks():
    robe = RobeArray(["A", "B"], 16, size=1 << 20, chunk=4)
    ids = torch.arange(20000)
    a, sign_a = robe.locate(ids, torch.zeros_like(ids))
    b, sign_b = robe.locate(ids, torch.ones_like(ids))
    assert (a[:, 0] == b[:, 0]).float().mean() < 0.001  # same ids, different offsets
    assert (a[:, 0] == a[:, 4]).float().mean() < 0.001  # chunks of one row land apart
    agree = (sign_a == sign_b).float().mean().item()
    assert agree == pytest.approx(0.5, abs=0.01)
    assert sign_a.mean().item() == pytest.approx(0.0, abs=0.01)


def test_array_takes_the_budget_left_after_the_tables():
    features = [FeatureSpec("big", 100_000), FeatureSpec("mid", 3000), FeatureSpec("tiny", 7)]
    layer = build_compressor("robe", features, 16, "100x")
    tables = TableSpec("t", 7, 16).serve_bytes
    assert layer.hyperparameters()["table_fields"] == ["tiny"]
    assert layer.module.size == (layer.budget_bytes - tables) // 4
    memory = layer.memory()
    assert memory.parts == {"table.t_tiny": tables, "robe": 4 * layer.module.size}
    assert memory.train_bytes == 3 * 4 * layer.module.size + TableSpec("t", 7, 16).train_bytes(
        "rowwise_adagrad"
    )
    # A budget above the compressed fields' size never buys a larger array than they need.
    roomy = build_compressor("robe", features, 16, "1x")
    assert roomy.module.size == (100_000 + 3000) * 16


def test_chunk_must_divide_dim():
    with pytest.raises(ValueError, match="chunk must divide"):
        build_compressor("robe", [FeatureSpec("a", 1000)], 16, "10x", chunk=5)
