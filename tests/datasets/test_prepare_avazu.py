"""``prepare avazu`` on a 30-row train.csv fixture (header, bad hour on line 9, 23 columns on
line 16, empty banner_pos and site_domain on line 22)."""

from __future__ import annotations

import datetime

import pyarrow as pa
import pytest

from datasets.encode import RawEncoder
from datasets.prepare import BadInputError
from datasets.prepare.columns import Issues
from datasets.readers.avazu import AVAZU_COLUMNS, prepare_avazu, split_hour
from tests.helpers.prepare_support import FIXTURES, decode, gzip_copy, options, read_all_splits

TRAIN_CSV = FIXTURES / "avazu" / "train.csv"


def test_hour_becomes_hour_of_day_and_weekday():
    issues = Issues(5)
    hours = pa.array(["14102100", "14102523", "14103017", "14022900", None])
    hour_of_day, weekday = split_hour(hours, issues)
    # 2014-10-21 was a Tuesday (Monday = 0), 2014-10-25 a Saturday, 2014-10-30 a Thursday.
    assert datetime.date(2014, 10, 21).weekday() == 1
    assert hour_of_day.to_pylist() == ["0", "23", "17", None, None]
    assert weekday.to_pylist() == ["1", "5", "3", None, None]
    # 29 February 2014 does not exist: flagged, not silently rolled over to 1 March.
    assert issues.bad_mask().tolist() == [False, False, False, True, False]
    assert issues.flags[0].reason == "bad_value"


def test_prepared_fields_rows_and_bad_rows(tmp_path):
    meta = prepare_avazu([TRAIN_CSV], tmp_path, options(min_count=1))
    assert meta.sparse_names[:2] == ["hour_of_day", "weekday"]
    assert "id" not in meta.sparse_names and "hour" not in meta.sparse_names
    assert len(meta.sparse_names) == len(AVAZU_COLUMNS) - 3 + 2
    assert sum(meta.rows(s) for s in meta.splits) == 28
    assert meta.bad_rows == {
        "bad_value": {"count": 1, "examples": [f"{TRAIN_CSV}:9"], "fields": {"hour": 1}},
        "wrong_column_count": {"count": 1, "examples": [f"{TRAIN_CSV}:16"]},
    }
    assert meta.options["min_count"] == 1


def test_every_row_decodes_back_to_its_line(tmp_path):
    # Everything in train, in file order, so every value is in the vocabulary.
    prepare_avazu(
        [TRAIN_CSV], tmp_path, options(min_count=1, split="ordered", fractions=(1.0, 0.0, 0.0))
    )
    table = read_all_splits(tmp_path)
    lines = TRAIN_CSV.read_text().splitlines()[1:]
    good = [line.split(",") for n, line in enumerate(lines, 2) if n not in (9, 16)]
    assert table.num_rows == len(good) == 28
    assert table["label"].to_pylist() == [float(f[1]) for f in good]
    hours = [f[2] for f in good]
    assert decode(tmp_path, "hour_of_day", table["hour_of_day"].to_pylist()) == [
        str(int(h[6:])) for h in hours
    ]
    assert decode(tmp_path, "weekday", table["weekday"].to_pylist()) == [
        str(datetime.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6])).weekday()) for h in hours
    ]
    for column in ("site_id", "device_ip", "C21", "banner_pos"):
        i = AVAZU_COLUMNS.index(column)
        assert decode(tmp_path, column, table[column].to_pylist()) == [f[i] or None for f in good]
    line_22 = 22 - 2 - 2  # its index: the header, line 9 and line 16 are not rows
    assert good[line_22][4] == good[line_22][6] == ""
    assert table["banner_pos"][line_22].as_py() == table["site_domain"][line_22].as_py() == 0


def test_gzip_and_header_check(tmp_path):
    gz = gzip_copy(TRAIN_CSV, tmp_path / "train.csv.gz")
    prepare_avazu([TRAIN_CSV], tmp_path / "plain", options())
    prepare_avazu([gz], tmp_path / "gz", options())
    assert read_all_splits(tmp_path / "gz").equals(read_all_splits(tmp_path / "plain"))
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("id,hour,C1\n1,14103100,1005\n")
    with pytest.raises(BadInputError, match="test.csv:1: header .* has no click labels"):
        prepare_avazu([test_csv], tmp_path / "t", options())


def test_raw_lines_encode_to_the_prepared_rows(tmp_path):
    meta = prepare_avazu([TRAIN_CSV], tmp_path, options(min_count=2, split="ordered"))
    lines = TRAIN_CSV.read_text().splitlines()
    records = [
        dict(zip(AVAZU_COLUMNS, line.split(","), strict=True))
        for n, line in enumerate(lines[1:], 2)
        if n not in (9, 16)
    ]
    encoded = RawEncoder.load(tmp_path).encode(records)  # id and click are accepted, unused
    table = read_all_splits(tmp_path)
    for field in meta.sparse_names:
        assert encoded.sparse[field].tolist() == table[field].to_pylist(), field
    with pytest.raises(ValueError, match="bad_value in field 'hour'"):
        RawEncoder.load(tmp_path).encode([{"hour": "14022900"}])
