"""``prepare table`` on UCI Adult's exact files: text labels (``>50K`` / ``<=50K.``), spaces
after the commas, a ``|1x3 Cross validator`` first line in adult.test, and numeric columns
bucketised by train-split quantiles (capital gain/loss zero-inflated) that serving
reproduces. The fixture is the first 36 lines of adult.data and 18 of adult.test."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from datasets.encode import RawEncoder
from datasets.prepare import BadInputError
from datasets.prepared import DatasetMeta, load_vocab
from datasets.readers.quantiles import ZERO_TOKEN
from datasets.readers.table import TableSchema, prepare_table
from tests.helpers.prepare_support import FIXTURES, options, read_all_splits, read_split

ADULT = FIXTURES / "adult"
FILES = [ADULT / "adult.data", ADULT / "adult.test"]
SCHEMA = TableSchema.from_file(ADULT / "schema.json")
# adult.data (36 rows + an empty line) is train, adult.test (its first line, 18 rows and an
# empty line) is test: the ordered split cuts at line 37 of 57.
BY_FILE = {"split": "ordered", "fractions": (37 / 57, 0.0, 20 / 57)}


def _rows(path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [line.split(", ") for line in lines if ", " in line]


def test_text_labels_map_and_spaces_are_trimmed(tmp_path):
    meta = prepare_table(FILES, tmp_path, SCHEMA, options(**BY_FILE))
    train, test = _rows(FILES[0]), _rows(FILES[1])
    assert (meta.rows("train"), meta.rows("test")) == (len(train), len(test)) == (36, 18)
    expected = [float(r[-1].startswith(">50K")) for r in train + test]
    assert read_all_splits(tmp_path)["label"].to_pylist() == expected
    assert sum(expected) == 16  # both ">50K" and adult.test's ">50K." are positives
    assert set(meta.bad_rows) == {"empty_row", "wrong_column_count"}  # the empty last lines
    vocab = load_vocab(tmp_path)
    assert "State-gov" in vocab["workclass"] and " State-gov" not in vocab["workclass"]


def test_an_unmappable_label_names_its_value_file_and_line(tmp_path, capsys):
    strict = replace(SCHEMA, positive=(">50K",), negative=("<=50K",))
    rows = tmp_path / "rows.csv"  # adult.test without its first and last lines
    rows.write_text("\n".join(FILES[1].read_text().splitlines()[1:-1]) + "\n")
    with pytest.raises(
        BadInputError, match=r"rows.csv:1: bad_label in field 'income' \(value '<=50K\.'\)"
    ):
        prepare_table([rows], tmp_path / "fail", strict, options(on_bad_row="fail"))
    # Skipping them drops a third of the rows: too many to pass silently.
    with pytest.raises(BadInputError, match=r"21 of 57 rows were bad .*adult.test:2: .*'<=50K\.'"):
        prepare_table(FILES, tmp_path / "skip", strict, options(**BY_FILE))
    assert "field 'income' value '<=50K.'" in capsys.readouterr().err
    assert not (tmp_path / "skip" / "meta.json").exists()


def test_label_values_must_come_in_pairs():
    with pytest.raises(ValueError, match="`positive` needs `negative` too"):
        TableSchema(label="y", categorical=("a",), positive=(">50K",))
    with pytest.raises(ValueError, match=r"\['1'\] are both positive and negative"):
        TableSchema(label="y", categorical=("a",), positive=("1",), negative=("1", "0"))
    with pytest.raises(ValueError, match="numeric_as 'buckets' needs numeric_buckets >= 2"):
        TableSchema(label="y", numeric=("x",), numeric_as="buckets")


def test_numeric_buckets_come_from_the_train_split_only(tmp_path):
    meta = prepare_table(FILES, tmp_path, SCHEMA, options(**BY_FILE))
    buckets = meta.options["config"]["buckets"]
    train = _rows(FILES[0])
    age = np.array([float(r[0]) for r in train])
    # 36 train values fit the reservoir: the edges are exact train quantiles (first value
    # whose cumulative count exceeds k/20 of the rows), whatever adult.test holds.
    sorted_age = np.sort(age)
    levels = len(age) * np.arange(1, 20) / 20
    exact = np.unique(sorted_age[np.searchsorted(np.arange(1, len(age) + 1), levels, "right")])
    assert buckets["age"]["edges"] == [e for e in exact.tolist() if e > sorted_age[0]]
    assert buckets["age"]["zero_bucket"] is False
    every_age = np.sort([float(r[0]) for r in train + _rows(FILES[1])])  # test rows included
    levels = len(every_age) * np.arange(1, 20) / 20
    pooled = every_age[np.searchsorted(np.arange(1, len(every_age) + 1), levels, "right")]
    assert buckets["age"]["edges"] != [e for e in np.unique(pooled) if e > every_age[0]]
    # capital-gain is 0 in 33 of 36 train rows: 0 gets its own bucket (the most frequent, id 1)
    # and the quantile buckets split the 3 non-zero values.
    gain = buckets["capital-gain"]
    assert gain["zero_bucket"] and gain["order"][0] == ZERO_TOKEN
    nonzero = sorted(float(r[10]) for r in train if r[10] != "0")
    assert len(nonzero) == 3 and gain["edges"] == nonzero[1:]
    # The bucket fields are categorical fields beside the dense values (numeric_as both).
    assert meta.dense == list(SCHEMA.numeric)
    assert meta.sparse_names[-6:] == [f"{c}_bucket" for c in SCHEMA.numeric]
    # Frequencies are exact train counts by id, as for every counted field.
    table = read_split(tmp_path, "train")
    for field in ("age_bucket", "capital-gain_bucket"):
        ids = np.array(table[field].to_pylist())
        card = next(f.cardinality for f in meta.sparse if f.name == field)
        np.testing.assert_array_equal(meta.frequencies()[field], np.bincount(ids, minlength=card))
    assert meta.frequencies()["capital-gain_bucket"][1] == 33


def test_buckets_only_drops_the_dense_values(tmp_path):
    meta = prepare_table(FILES, tmp_path, replace(SCHEMA, numeric_as="buckets"), options(**BY_FILE))
    assert meta.dense == [] and len(meta.sparse) == 14
    assert read_all_splits(tmp_path).num_rows == 54


def test_raw_records_bucketise_at_serving_exactly_as_prepared(tmp_path):
    meta = prepare_table(FILES, tmp_path, SCHEMA, options(**BY_FILE))
    encoder = RawEncoder.load(tmp_path)
    names = list(SCHEMA.columns[:-1])
    records = [dict(zip(names, r[:-1], strict=True)) for r in _rows(FILES[0]) + _rows(FILES[1])]
    for r in records:  # a serving client sends numbers as numbers
        r.update({c: int(r[c]) for c in SCHEMA.numeric})
    encoded = encoder.encode(records)
    table = read_all_splits(tmp_path)
    for f in meta.sparse:
        assert list(encoded.sparse[f.name]) == table[f.name].to_pylist(), f.name
    np.testing.assert_array_equal(
        encoded.dense, np.stack([table[d].to_numpy() for d in meta.dense], 1)
    )
    # A value never seen in train still lands in a bucket; a missing one is id 0.
    far = encoder.encode([{"capital-gain": 10**9}, {"capital-gain": 0}, {}])
    ids = far.sparse["capital-gain_bucket"]
    assert ids[0] > 1 and ids[1] == 1 and ids[2] == 0


def test_tampered_bucket_edges_are_refused(tmp_path):
    prepare_table(FILES, tmp_path, SCHEMA, options(**BY_FILE))
    raw = json.loads((tmp_path / "meta.json").read_text())
    raw["options"]["config"]["buckets"]["age"]["edges"].reverse()
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="bucket edges are not ascending"):
        RawEncoder.load(tmp_path)
    assert DatasetMeta.load(tmp_path).name == "table"
