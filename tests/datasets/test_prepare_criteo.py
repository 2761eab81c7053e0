"""``prepare criteo`` on a 42-line Kaggle-format fixture, checked against a plain-Python reference.

The fixture (tests/fixtures/criteo/train.txt) holds 7 "days" of 6 lines, empty fields,
negative I2 values, a line with 39 columns (line 5), an unparsable I3 (line 11), a nearly
empty line (17) and a C1 value ``deadbeef`` seen only in the last (test) lines.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from datasets.loader import BatchLoader
from datasets.prepare import BadInputError, PrepareOptions
from datasets.prepared import DatasetMeta, load_vocab
from datasets.readers.criteo import (
    CRITEO_DENSE,
    CRITEO_SPARSE,
    CriteoConfig,
    CriteoDays,
    kaggle_day_bounds,
    prepare_criteo,
)
from tests.helpers.prepare_support import (
    FIXTURES,
    decode,
    gzip_copy,
    options,
    read_all_splits,
    read_split,
)

TRAIN_TXT = FIXTURES / "criteo" / "train.txt"


def reference(path, min_count: int, bucketize: bool = False):
    """What preprocessing must produce, computed line by line in plain Python."""
    lines = path.read_text().splitlines()
    bounds = kaggle_day_bounds(len(lines))
    rows = []
    for number, line in enumerate(lines, 1):
        f = line.split("\t")
        if len(f) != 40:
            continue
        try:
            ints = [float(x) if x else None for x in f[1:14]]
        except ValueError:
            continue
        rows.append((number - 1 < bounds[6], f, ints))
    tokens = []
    for _, f, ints in rows:
        t = {c: (f[14 + i] or None) for i, c in enumerate(CRITEO_SPARSE)}
        if bucketize:
            for d, x in zip(CRITEO_DENSE, ints, strict=True):
                t[f"{d}_bucket"] = (
                    None
                    if x is None
                    else str(int(math.floor(math.log(x) ** 2)) if x > 2 else int(x))
                )
        tokens.append(t)
    ids = {}
    for field in tokens[0]:
        counts = Counter(
            t[field]
            for (train, _, _), t in zip(rows, tokens, strict=True)
            if train and t[field] is not None
        )
        ranked = sorted(
            (v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v)
        )
        ids[field] = {v: i + 1 for i, v in enumerate(ranked)}
    expected = {
        "label": [float(f[0]) for _, f, _ in rows],
        **{
            d: [math.log1p(max(x[i], 0)) if x[i] is not None else 0.0 for _, _, x in rows]
            for i, d in enumerate(CRITEO_DENSE)
        },
        **{field: [ids[field].get(t[field], 0) for t in tokens] for field in ids},
    }
    return expected, ids, sum(train for train, _, _ in rows)


@pytest.mark.parametrize("min_count", [1, 2])
def test_encoded_rows_match_the_reference(tmp_path, min_count):
    meta = prepare_criteo([TRAIN_TXT], tmp_path, options=options(min_count=min_count))
    expected, ids, n_train = reference(TRAIN_TXT, min_count)
    table = read_all_splits(tmp_path)
    for column, values in expected.items():
        np.testing.assert_allclose(table[column].to_numpy(), values, rtol=1e-6, err_msg=column)
    assert meta.rows("train") == n_train == 34  # 36 lines of days 1-6, minus lines 5 and 11
    for field in CRITEO_SPARSE:
        assert load_vocab(tmp_path)[field] == ids[field]
        assert meta.sparse[CRITEO_SPARSE.index(field)].cardinality == len(ids[field]) + 1
    assert meta.options["min_count"] == min_count


def test_value_seen_only_in_test_is_oov_and_ids_follow_train_frequency(tmp_path):
    prepare_criteo([TRAIN_TXT], tmp_path, options=options(min_count=1))
    test = read_split(tmp_path, "test")
    assert test.num_rows == 3
    assert test["C1"].to_pylist() == [0, 0, 0]  # deadbeef: lines 40-42 only
    assert "deadbeef" not in load_vocab(tmp_path)["C1"]
    freq = DatasetMeta.load(tmp_path).frequencies()["C1"]
    assert (np.diff(freq[1:]) <= 0).all()  # id 1 is the most frequent train value
    train_c1 = read_split(tmp_path, "train")["C1"].to_numpy()
    np.testing.assert_array_equal(np.bincount(train_c1, minlength=len(freq)), freq)


def test_days_protocol_and_bad_rows_report(tmp_path):
    meta = prepare_criteo([TRAIN_TXT], tmp_path, options=options())
    assert {s: meta.rows(s) for s in meta.splits} == {"train": 34, "valid": 3, "test": 3}
    assert meta.bad_rows == {
        "wrong_column_count": {"count": 1, "examples": [f"{TRAIN_TXT}:5"]},
        "bad_number": {"count": 1, "examples": [f"{TRAIN_TXT}:11"], "fields": {"I3": 1}},
    }
    assert meta.options["split"]["protocol"] == "kaggle-7-days"
    assert meta.options["min_count"] == 10  # the Criteo default
    # valid is the first half of day 7 (lines 37-39), test the second (40-42), in order.
    lines = TRAIN_TXT.read_text().splitlines()
    assert read_split(tmp_path, "valid")["label"].to_pylist() == [float(x[0]) for x in lines[36:39]]
    assert read_split(tmp_path, "test")["label"].to_pylist() == [float(x[0]) for x in lines[39:42]]


def test_kaggle_day_bounds_follow_dlrm():
    assert kaggle_day_bounds(42) == [0, 6, 12, 18, 24, 30, 36, 42]
    assert kaggle_day_bounds(45) == [0, 7, 14, 21, 27, 33, 39, 45]  # first 45 % 7 days longer


def test_gzip_input_equals_plain_input(tmp_path):
    gz = gzip_copy(TRAIN_TXT, tmp_path / "train.txt.gz")
    prepare_criteo([TRAIN_TXT], tmp_path / "plain", options=options(min_count=1))
    meta = prepare_criteo([gz], tmp_path / "gz", options=options(min_count=1))
    assert read_all_splits(tmp_path / "gz").equals(read_all_splits(tmp_path / "plain"))
    assert load_vocab(tmp_path / "gz") == load_vocab(tmp_path / "plain")
    assert meta.bad_rows["wrong_column_count"]["examples"] == [f"{gz}:5"]


def test_tiny_blocks_keep_line_numbers_and_rows(tmp_path):
    """Blocks of ~1 KiB cut the file every few lines; nothing may shift."""
    text = TRAIN_TXT.read_text()
    no_final_newline = tmp_path / "train.txt"
    no_final_newline.write_text(text.rstrip("\n"))
    prepare_criteo([TRAIN_TXT], tmp_path / "big", options=options(min_count=1))
    meta = prepare_criteo(
        [no_final_newline], tmp_path / "small", options=options(min_count=1, block_bytes=1024)
    )
    assert read_all_splits(tmp_path / "small").equals(read_all_splits(tmp_path / "big"))
    assert meta.bad_rows["bad_number"]["examples"] == [f"{no_final_newline}:11"]
    assert meta.extra["lines_read"] == 42


def test_on_bad_row_fail_names_file_line_and_field(tmp_path):
    with pytest.raises(BadInputError, match=r"train\.txt:5: wrong_column_count: expected 40"):
        prepare_criteo([TRAIN_TXT], tmp_path / "a", options=options(on_bad_row="fail"))
    lines = TRAIN_TXT.read_text().splitlines()
    only_bad_number = tmp_path / "day_0"
    only_bad_number.write_text("\n".join(lines[5:12]) + "\n")  # the bad I3 is now on line 6
    with pytest.raises(BadInputError, match=r"day_0:6: bad_number in field 'I3' \(value '12x'\)"):
        prepare_criteo([only_bad_number], tmp_path / "b", options=options(on_bad_row="fail"))
    assert not (tmp_path / "b" / "meta.json").exists()


def test_empty_line_bad_encoding_and_bad_label_are_reported(tmp_path):
    good = TRAIN_TXT.read_text().splitlines()[0]
    bad_label = "2" + good[1:]
    lines = [
        good.encode(),
        b"",
        good.replace("\t", "\t\xff", 1).encode("latin-1"),
        bad_label.encode(),
        good.encode(),
    ]
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    meta = prepare_criteo(
        [path], tmp_path / "out", options=options(split="random", max_dropped_fraction=1.0)
    )
    assert {k: v["examples"] for k, v in meta.bad_rows.items()} == {
        "empty_row": [f"{path}:2"],
        "bad_encoding": [f"{path}:3"],
        "bad_label": [f"{path}:4"],
    }
    assert sum(meta.rows(s) for s in meta.splits) == 2


def test_day_files_default_and_chosen_days(tmp_path):
    lines = TRAIN_TXT.read_text().splitlines()
    days = []
    for d in range(7):
        days.append(tmp_path / f"day_{d}")
        days[-1].write_text("\n".join(lines[6 * d : 6 * d + 6]) + "\n")
    meta = prepare_criteo(days, tmp_path / "default", options=options(min_count=1))
    assert {s: meta.rows(s) for s in meta.splits} == {"train": 34, "valid": 3, "test": 3}
    prepare_criteo([TRAIN_TXT], tmp_path / "single", options=options(min_count=1))
    assert read_all_splits(tmp_path / "default").equals(read_all_splits(tmp_path / "single"))
    assert meta.bad_rows["bad_number"]["examples"] == [f"{days[1]}:5"]  # line 11 overall

    chosen = prepare_criteo(
        days,
        tmp_path / "chosen",
        days=CriteoDays(train=[0, 1, 2, 3], valid=[5], test=[6]),
        options=options(min_count=1),
    )
    assert {s: chosen.rows(s) for s in chosen.splits} == {"train": 22, "valid": 6, "test": 6}
    assert chosen.options["split"]["train"] == [0, 1, 2, 3]  # day 4 is not used at all
    with pytest.raises(BadInputError, match="both train and valid"):
        prepare_criteo(days, tmp_path / "x", days=CriteoDays(train=[0, 6]), options=options())


def test_random_split_is_seeded(tmp_path):
    def assignment(seed, name):
        prepare_criteo(
            [TRAIN_TXT], tmp_path / name, options=options(split="random", seed=seed, min_count=1)
        )
        return [
            read_split(tmp_path / name, s)["I1"].to_pylist() for s in ("train", "valid", "test")
        ]

    first, again, other = assignment(0, "a"), assignment(0, "b"), assignment(1, "c")
    assert first == again
    assert first != other
    assert sum(map(len, first)) == 40


def test_bucketized_dense_fields(tmp_path):
    meta = prepare_criteo(
        [TRAIN_TXT], tmp_path, CriteoConfig(bucketize_dense=True), options=options(min_count=1)
    )
    assert meta.sparse_names[26:] == [f"I{i}_bucket" for i in range(1, 14)]
    expected, ids, _ = reference(TRAIN_TXT, 1, bucketize=True)
    table = read_all_splits(tmp_path)
    for d in CRITEO_DENSE:
        assert table[f"{d}_bucket"].to_pylist() == expected[f"{d}_bucket"], d
    # I2 holds -1..-3, which stay their own tokens; a large count lands in a log^2 bucket.
    assert {"-1", "-2", "-3"} & set(ids["I2_bucket"])
    assert meta.options["config"] == {"bucketize_dense": True, "dense_transform": "clamp_log1p"}


def test_batch_loader_reads_the_prepared_split(tmp_path):
    meta = prepare_criteo([TRAIN_TXT], tmp_path, options=options(min_count=1))
    table = read_split(tmp_path, "train")
    batches = list(BatchLoader(tmp_path, "train", batch_size=8))
    assert sum(len(b.labels) for b in batches) == meta.rows("train")
    np.testing.assert_array_equal(
        torch.cat([b.labels for b in batches]).numpy(), table["label"].to_numpy()
    )
    np.testing.assert_allclose(
        torch.cat([b.dense_features for b in batches]).numpy(),
        np.stack([table[d].to_numpy() for d in CRITEO_DENSE], 1),
    )
    for field in ("C1", "C26"):
        got = torch.cat([b.sparse_features[field].values() for b in batches]).numpy()
        np.testing.assert_array_equal(got, table[field].to_numpy())
    assert decode(tmp_path, "C1", [1])[0] in TRAIN_TXT.read_text()


def test_existing_output_needs_overwrite(tmp_path):
    prepare_criteo([TRAIN_TXT], tmp_path, options=options())
    with pytest.raises(BadInputError, match="--overwrite"):
        prepare_criteo([TRAIN_TXT], tmp_path, options=options())
    meta = prepare_criteo([TRAIN_TXT], tmp_path, options=options(overwrite=True, min_count=1))
    assert DatasetMeta.load(tmp_path).options["min_count"] == meta.options["min_count"] == 1
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not a prepared dataset"):
        prepare_criteo([TRAIN_TXT], tmp_path, options=options(overwrite=True))


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="sum to 1"):
        prepare_criteo(
            [TRAIN_TXT], tmp_path, options=PrepareOptions(split="random", fractions=(0.5, 0.1, 0.1))
        )
    with pytest.raises(BadInputError, match="no such file"):
        prepare_criteo([tmp_path / "missing.txt"], tmp_path / "o", options=options())


def test_input_without_usable_train_rows_is_an_error(tmp_path):
    path = tmp_path / "broken.txt"
    path.write_text("1\t2\t3\n\n0\t1\n")
    with pytest.raises(BadInputError, match="no usable train rows in 3 lines"):
        prepare_criteo([path], tmp_path / "out", options=options(split="random"))
    assert not (tmp_path / "out" / "meta.json").exists()
