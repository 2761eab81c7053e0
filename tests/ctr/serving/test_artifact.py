"""Export / CompactModel: exact bytes, round trip, tolerance per storage, corrupt artifacts."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ctr import CompactModel, EmbeddingLayer, build_model, export, features_from_dataset
from ctr.serving.manifest import ArtifactError
from datasets.loader import BatchLoader


def _model(data, storage="fp32", name="deepfm", **options):
    torch.manual_seed(0)
    layer = EmbeddingLayer(
        features_from_dataset(data), 8, "full", "1x", storage=storage, init_scale=0.1, **options
    )
    return build_model(name, layer, 3, **({"hidden": [16]} if name == "deepfm" else {})).eval()


def _logits(model, data):
    batch = next(iter(BatchLoader(data, "test", batch_size=500)))
    with torch.no_grad():
        return model(batch.dense_features, batch.sparse_features)


@pytest.mark.parametrize("name", ["deepfm", "dlrm", "fm"])
def test_fp32_round_trip_is_exact(tiny_data, tmp_path, name):
    model = _model(tiny_data, name=name)
    manifest = export(model, tmp_path / "a", dataset=tiny_data)
    compact = CompactModel.load(tmp_path / "a")
    torch.testing.assert_close(
        _logits(compact, tiny_data), _logits(model, tiny_data), rtol=0, atol=1e-5
    )
    assert manifest["model"]["name"] == name
    assert (tmp_path / "a" / "vocab.parquet").exists()


@pytest.mark.parametrize(("storage", "atol"), [("fp16", 2e-3), ("int8", 2e-2), ("int4", 0.25)])
def test_low_precision_stays_within_tolerance(tiny_data, tmp_path, storage, atol):
    fp32 = _model(tiny_data)
    quant = _model(tiny_data, storage=storage)  # same seed: same trained weights
    export(quant, tmp_path / storage, dataset=tiny_data)
    diff = _logits(CompactModel.load(tmp_path / storage), tiny_data) - _logits(fp32, tiny_data)
    assert diff.abs().max() < atol
    assert diff.abs().max() > 0  # it really is quantised


@pytest.mark.parametrize("storage", ["fp32", "int4"])
@pytest.mark.parametrize("shared", [False, True])
def test_serve_bytes_equal_the_embedding_bytes_written(tiny_data, tmp_path, storage, shared):
    model = _model(tiny_data, storage=storage, shared=shared)
    manifest = export(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "tensors.safetensors"))
    written = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("embedding.")
    )
    assert written == manifest["embedding"]["serve_bytes"] == model.embedding.memory().serve_bytes
    assert CompactModel.load(tmp_path / "a").serve_bytes == written


def test_corrupt_or_inconsistent_artifacts_are_refused(tiny_data, tmp_path):
    export(_model(tiny_data), tmp_path / "a")
    path = tmp_path / "a" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        CompactModel.load(tmp_path / "a")

    export(_model(tiny_data), tmp_path / "b")
    manifest_path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    first = next(k for k in manifest["tensors"] if k.startswith("embedding."))
    manifest["tensors"][first]["shape"][0] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest says"):
        CompactModel.load(tmp_path / "b")

    with pytest.raises(ArtifactError, match="not an artifact"):
        CompactModel.load(tmp_path)
    manifest_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid JSON at line 1"):
        CompactModel.load(tmp_path / "b")


def test_export_replaces_atomically_and_loads_without_pickle(tiny_data, tmp_path):
    export(_model(tiny_data), tmp_path / "a")
    export(_model(tiny_data, storage="int8"), tmp_path / "a", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "manifest.json",
        "tensors.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.")]  # no temp leftovers
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["embedding"]["config"]["tables"][0]["dtype"] == "int8"
    # safetensors holds only raw tensors: nothing in the artifact is executable
    raw = (tmp_path / "a" / "tensors.safetensors").read_bytes()
    assert b"\x80\x04" not in raw[:16] and raw[8:9] == b"{"


def test_predicts_from_raw_values_like_from_prepared_ids(tiny_data, tmp_path):
    import pyarrow.parquet as pq

    from datasets.prepared import DatasetMeta, load_vocab

    model = _model(tiny_data)
    export(model, tmp_path / "a", dataset=tiny_data)
    compact = CompactModel.load(tmp_path / "a")
    meta = DatasetMeta.load(tiny_data)
    rows = pq.read_table(meta.files("test")).to_pandas().head(50)
    raw_of = {f: {i: v for v, i in vocab.items()} for f, vocab in load_vocab(tiny_data).items()}
    records = []
    for _, row in rows.iterrows():
        record = {d: float(row[d]) for d in meta.dense}
        for f in meta.sparse:
            ids = list(row[f.name]) if f.multi_hot else [row[f.name]]
            raw = [raw_of[f.name].get(int(i), "never-seen-value") for i in ids]
            record[f.name] = raw if f.multi_hot else raw[0]
        records.append(record)
    expected = torch.sigmoid(_logits(compact, tiny_data)[:50]).numpy()
    got = compact.predict_records(records)
    assert abs(got - expected).max() < 1e-5
    with pytest.raises(ValueError, match="unknown fields \\['colour'\\]"):
        compact.predict_records([{"colour": "red"}])

    export(model, tmp_path / "bare")  # without its dataset: ids only
    with pytest.raises(ArtifactError, match="exported without its dataset"):
        CompactModel.load(tmp_path / "bare").predict_records(records)


def test_loading_does_not_move_the_global_random_stream(tiny_data, tmp_path):
    export(_model(tiny_data), tmp_path / "a")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    CompactModel.load(tmp_path / "a")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["deepfm", "dlrm", "fm"])
def test_forward_of_encoded_ids_equals_the_checked_forward(tiny_data, tmp_path, name):
    """``forward_encoded`` (ids known in range: no per-call range check) answers exactly as
    ``forward``, which still refuses an id outside its field's range."""
    from torchrec import KeyedJaggedTensor

    export(_model(tiny_data, name=name), tmp_path / "a")
    compact = CompactModel.load(tmp_path / "a")
    batch = next(iter(BatchLoader(tiny_data, "test", batch_size=64)))
    dense, sparse = batch.dense_features, batch.sparse_features
    torch.testing.assert_close(
        compact.forward_encoded(dense, sparse), compact(dense, sparse), rtol=0, atol=0
    )
    values = sparse.values().clone()
    values[0] = 10**6
    bad = KeyedJaggedTensor(keys=sparse.keys(), values=values, lengths=sparse.lengths())
    with pytest.raises(ValueError, match="outside"):
        compact(dense, bad)
