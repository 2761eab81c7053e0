"""``RawEncoder``: raw records encode to exactly the rows preprocessing wrote."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.encode import RawEncoder
from datasets.prepared import load_vocab
from datasets.readers.criteo import CRITEO_COLUMNS, CRITEO_DENSE, CriteoConfig, prepare_criteo
from datasets.readers.kdd12 import KDD12_COLUMNS, Kdd12Config, prepare_kdd12
from datasets.synthetic import SyntheticConfig, generate_synthetic
from tests.helpers.prepare_support import FIXTURES, options, read_all_splits

TRAIN_TXT = FIXTURES / "criteo" / "train.txt"


def _assert_encodes_to(encoded, table, meta):
    dense = np.stack([table[d].to_numpy() for d in meta.dense], 1) if meta.dense else None
    if dense is not None:
        np.testing.assert_array_equal(encoded.dense, dense)
    for f in meta.sparse:
        expected = table[f.name].to_pylist()
        got = encoded.sparse[f.name]
        got = [list(x) for x in got] if f.multi_hot else list(got)
        assert got == expected, f.name


def test_criteo_raw_lines_encode_to_the_prepared_rows(tmp_path):
    meta = prepare_criteo(
        [TRAIN_TXT], tmp_path, CriteoConfig(bucketize_dense=True), options=options(min_count=2)
    )
    lines = TRAIN_TXT.read_text().splitlines()
    records = [
        dict(zip(CRITEO_COLUMNS, line.split("\t"), strict=True))
        for n, line in enumerate(lines, 1)
        if n not in (5, 11)
    ]
    for r in records:  # serving clients send numbers as numbers
        r.update({d: int(r[d]) for d in CRITEO_DENSE if r[d]})
    encoder = RawEncoder.load(tmp_path)
    assert encoder.fields == CRITEO_COLUMNS[1:]
    encoded = encoder.encode(records)
    _assert_encodes_to(encoded, read_all_splits(tmp_path), meta)
    batch = encoded.to_batch()
    assert batch.sparse_features.keys() == meta.sparse_names
    assert batch.dense_features.shape == (40, 13)


def test_kdd12_records_encode_without_expansion(tmp_path):
    meta = prepare_kdd12(
        [FIXTURES / "kdd12" / "training.txt"],
        tmp_path,
        Kdd12Config("binary"),
        options(min_count=1, split="ordered", fractions=(1.0, 0.0, 0.0)),
    )
    lines = (FIXTURES / "kdd12" / "training.txt").read_text().splitlines()
    records = [
        dict(zip(KDD12_COLUMNS[2:], line.split("\t")[2:], strict=True))
        for n, line in enumerate(lines, 1)
        if n != 7
    ]
    _assert_encodes_to(RawEncoder.load(tmp_path).encode(records), read_all_splits(tmp_path), meta)


def test_synthetic_dataset_encodes_its_ranks(tmp_path):
    generate_synthetic(
        tmp_path,
        SyntheticConfig(
            rows=600, cardinalities=(30, 50), num_dense=2, multi_hot_fields=1, chunk_rows=256
        ),
        progress=False,
    )
    table = read_all_splits(tmp_path)
    vocab = load_vocab(tmp_path)
    raw = {f: {i: v for v, i in vocab[f].items()} for f in vocab}
    records = []
    for row in table.to_pylist():
        record = {d: row[d] for d in ("I1", "I2")}
        record.update({f: raw[f].get(row[f], "999999") for f in ("C1", "C2")})
        record["M1"] = [raw["M1"].get(i, "999999") for i in row["M1"]]
        records.append(record)
    encoder = RawEncoder.load(tmp_path)
    _assert_encodes_to(encoder.encode(records), table, encoder.meta)


def test_bad_records_are_refused_with_the_field(tmp_path):
    prepare_criteo([TRAIN_TXT], tmp_path, options=options())
    encoder = RawEncoder.load(tmp_path)
    with pytest.raises(ValueError, match=r"record 1: bad_number in field 'I3' \(value 'abc'\)"):
        encoder.encode([{"I3": "1"}, {"I3": "abc"}])
    with pytest.raises(ValueError, match=r"unknown fields \['C99'\]"):
        encoder.encode([{"C99": "x"}])
    missing = encoder.encode([{}])  # every value missing: OOV ids, zero dense
    assert missing.dense.tolist() == [[0.0] * 13]
    assert all(ids.tolist() == [0] for ids in missing.sparse.values())
