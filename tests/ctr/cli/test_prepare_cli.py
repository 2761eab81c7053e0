"""``ctr prepare …`` through :func:`add_prepare_parser` and argparse, as ``ctr/cli.py`` calls it."""

from __future__ import annotations

import argparse
import json

import pytest

from ctr.cli.prepare import add_prepare_parser
from datasets.prepared import DatasetMeta
from tests.helpers.prepare_support import FIXTURES, read_all_splits

QUIET = ["--no-progress"]


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ctr")
    add_prepare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepare", *argv])
    return args.func(args)


def test_criteo_command_writes_a_dataset(tmp_path):
    code = _run(
        "criteo",
        str(FIXTURES / "criteo" / "train.txt"),
        "--out",
        str(tmp_path),
        "--min-count",
        "2",
        "--bucketize-dense",
        *QUIET,
    )
    assert code == 0
    meta = DatasetMeta.load(tmp_path)
    assert meta.options["min_count"] == 2 and meta.options["config"]["bucketize_dense"]
    assert meta.rows("train") == 34


def test_bad_input_exits_2_naming_file_and_line(tmp_path, capsys):
    code = _run(
        "criteo",
        str(FIXTURES / "criteo" / "train.txt"),
        "--out",
        str(tmp_path),
        "--on-bad-row",
        "fail",
        *QUIET,
    )
    assert code == 2
    assert "train.txt:5: wrong_column_count" in capsys.readouterr().err
    assert _run("avazu", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"), *QUIET) == 2
    assert "nope.csv: no such file" in capsys.readouterr().err


def test_each_format_has_help_with_an_example(capsys):
    for name in ("criteo", "avazu", "kdd12", "movielens", "table"):
        with pytest.raises(SystemExit):
            _run(name, "--help")
        out = capsys.readouterr().out
        assert "example:" in out and f"ctr prepare {name}" in out and "--on-bad-row" in out


def test_table_flags_equal_the_schema_file(tmp_path):
    logs = str(FIXTURES / "table" / "logs.csv")
    assert (
        _run(
            "table",
            logs,
            "--out",
            str(tmp_path / "file"),
            "--schema",
            str(FIXTURES / "table" / "schema.json"),
            *QUIET,
        )
        == 0
    )
    assert (
        _run(
            "table",
            logs,
            "--out",
            str(tmp_path / "flags"),
            "--label",
            "clicked",
            "--categorical",
            "site,ad",
            "--numeric",
            "price",
            "--multi",
            "tags:|",
            *QUIET,
        )
        == 0
    )
    assert read_all_splits(tmp_path / "flags").equals(read_all_splits(tmp_path / "file"))


def test_other_formats_through_the_cli(tmp_path):
    assert (
        _run(
            "kdd12",
            str(FIXTURES / "kdd12" / "training.txt"),
            "--out",
            str(tmp_path / "k"),
            "--label",
            "binary",
            "--split",
            "ordered",
            "--fractions",
            "0.5,0.25,0.25",
            *QUIET,
        )
        == 0
    )
    meta = DatasetMeta.load(tmp_path / "k")
    assert [meta.rows(s) for s in ("train", "valid", "test")] == [9, 5, 5]  # line 7 is bad
    assert (
        _run(
            "movielens",
            str(FIXTURES / "ml-100k"),
            "--out",
            str(tmp_path / "m"),
            "--positive-rating",
            "5",
            "--no-year",
            *QUIET,
        )
        == 0
    )
    assert DatasetMeta.load(tmp_path / "m").options["config"] == {
        "positive_rating": 5.0,
        "year": False,
    }
    assert (
        _run(
            "avazu",
            str(FIXTURES / "avazu" / "train.csv"),
            "--out",
            str(tmp_path / "a"),
            "--seed",
            "4",
            "--max-dropped-fraction",  # the fixture's 2 bad rows in 30 are 6.7%
            "0.1",
            *QUIET,
        )
        == 0
    )
    assert DatasetMeta.load(tmp_path / "a").options["split"]["seed"] == 4


ADULT_SCHEMA = str(FIXTURES / "adult" / "schema.json")


def test_quiet_success_still_prints_its_summary(tmp_path, capsys):
    code = _run("criteo", str(FIXTURES / "criteo" / "train.txt"), "--out", str(tmp_path), *QUIET)
    assert code == 0
    err = capsys.readouterr().err
    assert f"{tmp_path}: train " in err and "rows; 13 dense and 26 sparse fields" in err


def test_errors_name_the_subcommand_even_with_a_format_flag(tmp_path, capsys):
    logs = str(FIXTURES / "table" / "logs.csv")
    code = _run("table", logs, "--out", str(tmp_path), "--label", "nope", "--format", "csv", *QUIET)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("ctr prepare table: error: ") and "None" not in err


def test_adult_through_flags_with_text_labels_and_buckets(tmp_path, capsys):
    adult = [str(FIXTURES / "adult" / n) for n in ("adult.data", "adult.test")]
    schema = json.loads((FIXTURES / "adult" / "schema.json").read_text())
    flags = [
        *("--format", "csv", "--columns", ",".join(schema["columns"]), "--label", "income"),
        *("--positive", ">50K", "--positive", ">50K.", "--negative", "<=50K"),
        *("--negative", "<=50K.", "--categorical", ",".join(schema["categorical"])),
        *("--numeric", ",".join(schema["numeric"]), "--numeric-buckets", "20"),
        *("--numeric-as", "both", "--max-dropped-fraction", "0.1", *QUIET),
    ]
    assert _run("table", *adult, "--out", str(tmp_path / "flags"), *flags) == 0
    assert (
        _run(
            "table",
            *adult,
            "--out",
            str(tmp_path / "file"),
            "--schema",
            ADULT_SCHEMA,
            "--max-dropped-fraction",
            "0.1",
            *QUIET,
        )
        == 0
    )
    assert read_all_splits(tmp_path / "flags").equals(read_all_splits(tmp_path / "file"))
    meta = DatasetMeta.load(tmp_path / "flags")
    assert sorted(meta.options["config"]["buckets"]) == sorted(schema["numeric"])
    # 3 bad rows of 57 (adult.test's first line, two empty last lines) exceed the default 5%.
    assert _run("table", *adult, "--out", str(tmp_path / "strict"), "--schema", ADULT_SCHEMA) == 2
    err = capsys.readouterr().err
    assert "ctr prepare table: error: " in err and "3 of 57 rows were bad" in err
    logs = str(FIXTURES / "table" / "logs.csv")
    half = ["--label", "clicked", "--categorical", "site", "--positive", "1", *QUIET]
    assert _run("table", logs, "--out", str(tmp_path / "half"), *half) == 2
    assert "`positive` needs `negative` too" in capsys.readouterr().err


def test_workers_flag_writes_the_one_process_dataset(tmp_path):
    args = ["criteo", str(FIXTURES / "criteo" / "train.txt"), "--min-count", "2", *QUIET]
    assert _run(*args, "--out", str(tmp_path / "one")) == 0
    assert _run(*args, "--out", str(tmp_path / "two"), "--workers", "2") == 0
    assert read_all_splits(tmp_path / "one").equals(read_all_splits(tmp_path / "two"))


@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5"])
def test_a_bad_workers_value_is_one_line(tmp_path, capsys, value):
    args = ["criteo", str(FIXTURES / "criteo" / "train.txt"), "--out", str(tmp_path / "d")]
    assert _run(*args, "--workers", value, *QUIET) == 2
    err = capsys.readouterr().err
    assert err == (
        f"ctr prepare criteo: error: --workers needs a whole number of processes >= 1, "
        f"got {value!r}\n"
    )
    assert not (tmp_path / "d").exists()
