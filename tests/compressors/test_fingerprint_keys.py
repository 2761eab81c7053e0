"""Hashing methods keyed by raw-value fingerprints serve without a vocabulary; id-keyed
methods count their vocabulary in the serving footprint."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from compressors import FeatureSpec
from compressors.core.keys import FingerprintKeys
from ctr import CompactModel, EmbeddingLayer, build_model, export, features_from_dataset
from ctr.serving.manifest import MANIFEST_FILE, TENSORS_FILE
from datasets.encode import RawEncoder
from datasets.fingerprint import MISSING, fingerprint_strings
from datasets.loader import BatchLoader


def test_fingerprints_are_stable_distinct_and_vectorised():
    values = pa.array(["68fd1e64", "", None, "a", "a" * 8, "a" * 8 + "b", "é", "a"])
    fps = fingerprint_strings(values)
    assert fps.dtype == np.int64 and fps[1] == fps[2] == MISSING
    assert fps[3] == fps[7] and len({*fps[[0, 3, 4, 5, 6]]}) == 5 and MISSING not in fps[[0, 3]]
    # Slices and chunked arrays fingerprint their own values.
    assert fingerprint_strings(values.slice(3, 2)).tolist() == fps[3:5].tolist()
    assert fingerprint_strings(pa.chunked_array([values[:3], values[3:]])).tolist() == fps.tolist()
    many = pa.array([str(i) for i in range(200_000)])
    assert len(np.unique(fingerprint_strings(many))) == 200_000


def test_fingerprint_keys_replace_only_their_fields():
    features = [
        FeatureSpec("a", 3, fingerprints=np.array([0, 11, 12])),
        FeatureSpec("b", 2, fingerprints=np.array([0, 21])),
    ]
    from torchrec import KeyedJaggedTensor

    kjt = KeyedJaggedTensor(
        keys=["a", "b"], values=torch.tensor([2, 0, 1, 1]), lengths=torch.tensor([1, 1, 1, 1])
    )
    out = FingerprintKeys(features, ["a"])(kjt)
    assert out.values().tolist() == [12, 0, 1, 1]
    with pytest.raises(ValueError, match="fingerprints=True"):
        FingerprintKeys([FeatureSpec("a", 3)], ["a"])


def _model(data, method, seed=0, budget="10x", **options):
    torch.manual_seed(seed)
    layer = EmbeddingLayer(
        features_from_dataset(data, fingerprints=True), 8, method, budget, init_scale=0.1, **options
    )
    return build_model("deepfm", layer, 3, hidden=[16]).eval()


def _vocab_records(data, n, seed):
    """Raw records whose values all lie in the vocabulary (or are missing)."""
    rng = np.random.default_rng(seed)
    encoder = RawEncoder.load(data)
    records = []
    for _ in range(n):
        record = {d: float(rng.normal()) for d in encoder.meta.dense}
        for f in encoder.meta.sparse:
            values = encoder.vocabs[f.name].values
            pick = values[int(rng.integers(len(values)))].as_py()
            if rng.random() < 0.9:
                record[f.name] = [pick] if f.multi_hot else pick
        records.append(record)
    return records, encoder


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("hash", {"shared": True, "threshold": 0}),
        ("unified", {"threshold": 0}),
        ("qr", {"threshold": 0, "budget": "4x"}),
        ("dhe", {"threshold": 0, "hashes": 64, "min_hashes": 16}),
    ],
)
def test_hashing_artifact_holds_no_vocabulary_and_predicts_like_training(
    tiny_data, tmp_path, method, options
):
    model = _model(tiny_data, method, keys="fingerprint", **options)
    assert model.embedding.fingerprint_fields == model.embedding.compressor.feature_names
    manifest = export(model, tmp_path / "a", dataset=tiny_data)
    assert not (tmp_path / "a" / "vocab.parquet").exists()
    assert manifest["embedding"]["footprint"]["vocabulary"] == 0
    assert manifest["embedding"]["footprint"]["total"] == manifest["embedding"]["serve_bytes"]
    compact = CompactModel.load(tmp_path / "a")
    records, encoder = _vocab_records(tiny_data, 300, seed=0)
    batch = encoder.encode(records).to_batch()  # ids through the dataset's vocabulary
    with torch.no_grad():
        trained = torch.sigmoid(model(batch.dense_features, batch.sparse_features)).numpy()
    np.testing.assert_allclose(compact.predict_records(records), trained, rtol=0, atol=1e-6)
    # The prepared split through the loader (ids -> fingerprints by the dataset) agrees too.
    loader = BatchLoader(tiny_data, "test", batch_size=500)
    probs, _ = compact.predict_loader(loader)
    first = next(iter(loader.epoch(0)))
    with torch.no_grad():
        expected = torch.sigmoid(model(first.dense_features, first.sparse_features)).numpy()
    np.testing.assert_allclose(probs[:500], expected, rtol=0, atol=1e-6)


def test_fingerprint_keys_change_what_is_hashed(tiny_data):
    """The keys really are fingerprints: the same weights keyed by id predict differently."""
    by_id = _model(tiny_data, "hash", shared=True, threshold=0)
    by_fp = _model(tiny_data, "hash", shared=True, threshold=0, keys="fingerprint")
    by_fp.load_state_dict(by_id.state_dict())
    batch = next(iter(BatchLoader(tiny_data, "test", batch_size=200).epoch(0)))
    with torch.no_grad():
        a = by_id(batch.dense_features, batch.sparse_features)
        b = by_fp(batch.dense_features, batch.sparse_features)
    assert not torch.allclose(a, b)


def test_mixed_methods_ship_only_the_vocabulary_of_id_keyed_fields(tiny_data, tmp_path):
    # Per-field hashing keeps the small fields collisionless: those need their ids.
    model = _model(tiny_data, "hash", budget="2x", keys="fingerprint")
    keyed = model.embedding.fingerprint_fields
    names = model.embedding.compressor.feature_names
    assert 0 < len(keyed) < len(names)
    manifest = export(model, tmp_path / "a", dataset=tiny_data)
    shipped = set(pq.read_table(tmp_path / "a" / "vocab.parquet")["field"].to_pylist())
    assert shipped == set(names) - set(keyed)
    vocab_bytes = (tmp_path / "a" / "vocab.parquet").stat().st_size
    footprint = manifest["embedding"]["footprint"]
    assert footprint == {
        "tables": manifest["embedding"]["serve_bytes"],
        "vocabulary": vocab_bytes,
        "total": manifest["embedding"]["serve_bytes"] + vocab_bytes,
    }
    records, encoder = _vocab_records(tiny_data, 100, seed=1)
    batch = encoder.encode(records).to_batch()
    with torch.no_grad():
        trained = torch.sigmoid(model(batch.dense_features, batch.sparse_features)).numpy()
    compact = CompactModel.load(tmp_path / "a")
    np.testing.assert_allclose(compact.predict_records(records), trained, rtol=0, atol=1e-6)


def test_id_keyed_footprint_counts_the_vocabulary(tiny_data, tmp_path):
    model = _model(tiny_data, "full", budget="1x")
    manifest = export(model, tmp_path / "a", dataset=tiny_data)
    vocab = (tmp_path / "a" / "vocab.parquet").stat().st_size
    tensors = (tmp_path / "a" / TENSORS_FILE).stat().st_size
    assert (tmp_path / "a" / MANIFEST_FILE).exists() and tensors > 0
    assert manifest["embedding"]["footprint"]["vocabulary"] == vocab > 0
    with pytest.raises(ValueError, match="hashes no field"):
        _model(tiny_data, "full", budget="1x", keys="fingerprint")
