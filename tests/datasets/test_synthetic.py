import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasets.prepared import DatasetMeta, load_vocab
from datasets.synthetic import SyntheticConfig, generate_synthetic


def _read(meta: DatasetMeta, split: str):
    return pq.read_table(meta.files(split)).to_pandas()


def test_meta_records_schema_rows_and_teacher(tiny_data):
    meta = DatasetMeta.load(tiny_data)
    assert [f.name for f in meta.sparse] == [f"C{i}" for i in range(1, 8)] + ["M1"]
    assert meta.sparse[-1].multi_hot and not meta.sparse[0].multi_hot
    assert meta.dense == ["I1", "I2", "I3"]
    assert sum(meta.rows(s) for s in ("train", "valid", "test")) == 5_000
    assert len(meta.files("train")) == 3  # 4000 rows at 1500 per shard
    teacher = meta.extra["teacher"]
    assert 0.6 < teacher["test_auc"] < 1.0
    assert 0.15 < teacher["test_ctr"] < 0.35
    raw = json.loads((tiny_data / "meta.json").read_text())
    assert raw["teacher"]["test_auc"] == teacher["test_auc"]


def test_ids_follow_descending_train_frequency(tiny_data):
    meta = DatasetMeta.load(tiny_data)
    freqs = meta.frequencies()
    train = _read(meta, "train")
    for field in meta.sparse:
        counts = freqs[field.name]
        assert counts[0] == 0  # min_count=1: nothing seen in train is OOV
        assert np.all(np.diff(counts[1:]) <= 0), field.name
        column = train[field.name]
        values = np.concatenate(column.to_numpy()) if field.multi_hot else column.to_numpy()
        observed = np.bincount(values, minlength=field.cardinality)
        np.testing.assert_array_equal(observed, counts)


def test_vocab_lists_every_train_value(tiny_data):
    meta = DatasetMeta.load(tiny_data)
    vocab = load_vocab(tiny_data)
    for field in meta.sparse:
        ids = sorted(vocab[field.name].values())
        assert ids == list(range(1, field.cardinality))


def test_values_unseen_in_train_map_to_oov(tmp_path):
    # 5000 possible values, 1600 train rows: many valid/test values never occur in train.
    meta = generate_synthetic(
        tmp_path, SyntheticConfig(rows=2_000, cardinalities=(5000,), num_dense=1), progress=False
    )
    train, test = _read(meta, "train")["C1"], _read(meta, "test")["C1"]
    assert (train > 0).all()
    assert (test == 0).any()
    assert meta.sparse[0].cardinality == train.nunique() + 1


def test_deterministic_and_independent_of_chunking(tmp_path):
    base = SyntheticConfig(rows=3_000, cardinalities=(30, 300), num_dense=2, seed=3)
    a = generate_synthetic(tmp_path / "a", base, progress=False)
    b = generate_synthetic(tmp_path / "b", base, progress=False)
    pd_a, pd_b = _read(a, "train"), _read(b, "train")
    assert pd_a.equals(pd_b)
    other = generate_synthetic(
        tmp_path / "c", SyntheticConfig(**{**base.__dict__, "seed": 4}), progress=False
    )
    assert not _read(other, "train").equals(pd_a)


def test_chunked_generation_matches_row_count_and_labels(tmp_path):
    config = SyntheticConfig(rows=10_000, cardinalities=(50, 50, 50), num_dense=1, chunk_rows=999)
    meta = generate_synthetic(tmp_path, config, progress=False)
    total = sum(len(_read(meta, s)) for s in ("train", "valid", "test"))
    assert total == 10_000
    labels = _read(meta, "train")["label"]
    assert set(labels.unique()) <= {0.0, 1.0}


def test_signal_pattern_gives_some_fields_no_signal(tmp_path):
    # Field 4 (index 3) carries no signal by construction: its values do not move the CTR.
    config = SyntheticConfig(rows=60_000, cardinalities=(10, 10, 10, 10), num_dense=1)
    meta = generate_synthetic(tmp_path, config, progress=False)
    df = _read(meta, "train")
    spread = {c: df.groupby(c)["label"].mean().std() for c in ("C1", "C4")}
    assert spread["C1"] > 3 * spread["C4"]


@pytest.mark.parametrize("bad", [dict(rows=5), dict(base_rate=1.5), dict(zipf_exponent=1.0)])
def test_invalid_configs_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path, SyntheticConfig(**bad), progress=False)
