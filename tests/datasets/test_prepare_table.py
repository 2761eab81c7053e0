"""``prepare table`` on a CSV with a JSON schema (quoted commas, missing numbers, multi-valued
tags, a bad label on line 10), the same data as parquet, and a header-less TSV."""

from __future__ import annotations

import csv
import gzip
import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets.prepare import BadInputError
from datasets.readers.table import TableSchema, prepare_table
from tests.helpers.prepare_support import FIXTURES, decode, options, read_all_splits

LOGS_CSV = FIXTURES / "table" / "logs.csv"
SCHEMA_JSON = FIXTURES / "table" / "schema.json"
ALL_TRAIN = {"split": "ordered", "fractions": (1.0, 0.0, 0.0)}


def _good_rows() -> list[dict]:
    with open(LOGS_CSV, newline="") as f:
        return [r for r in csv.DictReader(f) if r["clicked"] != "yes"]


def test_csv_with_json_schema(tmp_path):
    meta = prepare_table(
        [LOGS_CSV], tmp_path, TableSchema.from_file(SCHEMA_JSON), options(**ALL_TRAIN)
    )
    rows = _good_rows()
    table = read_all_splits(tmp_path)
    assert table.num_rows == len(rows) == 23
    assert meta.bad_rows == {
        "bad_label": {"count": 1, "examples": [f"{LOGS_CSV}:10"], "fields": {"clicked": 1}}
    }
    assert meta.dense == ["price"] and meta.sparse_names == ["site", "ad", "tags"]
    assert table["label"].to_pylist() == [float(r["clicked"]) for r in rows]
    prices = [float(r["price"]) if r["price"] else 0.0 for r in rows]
    np.testing.assert_allclose(
        table["price"].to_numpy(), [math.copysign(math.log1p(abs(p)), p) for p in prices], rtol=1e-6
    )
    for field in ("site", "ad"):
        assert decode(tmp_path, field, table[field].to_pylist()) == [r[field] for r in rows]
    tags = [decode(tmp_path, "tags", ids) for ids in table["tags"].to_pylist()]
    assert tags == [[t for t in r["tags"].split("|") if t] for r in rows]
    assert meta.options["config"]["numeric_transform"] == "signed_log1p"


def test_parquet_with_a_list_column_gives_the_same_rows(tmp_path):
    rows = _good_rows()
    pq.write_table(
        pa.table(
            {
                "clicked": pa.array([int(r["clicked"]) for r in rows]),
                "site": [r["site"] for r in rows],
                "ad": [r["ad"] for r in rows],
                "price": pa.array([float(r["price"]) if r["price"] else None for r in rows]),
                "tags": pa.array(
                    [[t for t in r["tags"].split("|") if t] for r in rows], pa.list_(pa.string())
                ),
            }
        ),
        tmp_path / "logs.parquet",
    )
    schema = TableSchema.from_file(SCHEMA_JSON)
    prepare_table([LOGS_CSV], tmp_path / "csv", schema, options(**ALL_TRAIN))
    meta = prepare_table(
        [tmp_path / "logs.parquet"],
        tmp_path / "pq",
        replace(schema, format=None),
        options(**ALL_TRAIN),
    )
    assert meta.bad_rows == {}
    assert read_all_splits(tmp_path / "pq").equals(read_all_splits(tmp_path / "csv"))


def test_headerless_tsv_with_named_columns_and_integer_categories(tmp_path):
    path = tmp_path / "clicks.tsv.gz"
    with gzip.open(path, "wt") as f:
        f.write("1\t7\t0.5\n0\t7\t\n1\t8\tnan\n0\t\t-3\n")
    schema = TableSchema(
        label="y",
        categorical=("item",),
        numeric=("x",),
        header=False,
        columns=("y", "item", "x"),
        numeric_transform="identity",
    )
    meta = prepare_table([path], tmp_path / "out", schema, options(**ALL_TRAIN))
    table = read_all_splits(tmp_path / "out")
    assert table["x"].to_pylist() == [0.5, 0.0, 0.0, -3.0]  # empty and nan are missing
    assert decode(tmp_path / "out", "item", table["item"].to_pylist()) == ["7", "7", "8", None]
    assert meta.bad_rows == {}


def test_schema_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown keys \\['categorial'\\]"):
        TableSchema.from_dict({"label": "y", "categorial": ["a"]})
    with pytest.raises(ValueError, match="appear more than once"):
        TableSchema(label="y", categorical=("a",), numeric=("a",))
    with pytest.raises(ValueError, match="may not be called 'label'"):
        TableSchema(label="y", categorical=("label",))
    schema = TableSchema(label="clicked", categorical=("site", "campaign"))
    with pytest.raises(BadInputError, match=r"logs.csv: no columns \['campaign'\]"):
        prepare_table([LOGS_CSV], tmp_path, schema, options())


def test_a_quote_spanning_lines_stops_with_its_line(tmp_path):
    path = tmp_path / "quoted.csv"
    path.write_text('clicked,site\n1,a\n0,"b\nc"\n1,d\n')
    with pytest.raises(BadInputError, match=r"quoted.csv:3: a quoted value spans lines"):
        prepare_table(
            [path], tmp_path / "out", TableSchema(label="clicked", categorical=("site",)), options()
        )
