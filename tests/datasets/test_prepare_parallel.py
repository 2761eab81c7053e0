"""``prepare`` with ``workers=2`` (and on a local Ray instance) writes the dataset one process
writes: the same vocabulary, frequencies, meta.json, shard files and ids row for row.

Inputs are the real-format fixtures and generated files large enough to be cut into several
byte-range pieces (``block_bytes`` at its 1 KiB minimum), with a header, a byte-order mark,
CRLF line ends, quoted commas, empty and malformed lines, so that a piece starting on the
wrong line, a merge that thresholds before summing, or pieces appended out of order show up
as a difference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasets.prepare import BadInputError
from datasets.prepare.engine import prepare_dataset
from datasets.prepare.parallel import ParallelPasses
from datasets.prepare.sources import TextSource
from datasets.prepare.splits import FileReader, random_split
from datasets.prepared import SPLITS, DatasetMeta
from datasets.readers.avazu import prepare_avazu
from datasets.readers.criteo import CRITEO_COLUMNS, CriteoFormat, prepare_criteo
from datasets.readers.kdd12 import prepare_kdd12
from datasets.readers.movielens import prepare_movielens
from datasets.readers.table import TableSchema, prepare_table
from tests.helpers import ROOT
from tests.helpers.prepare_support import FIXTURES, gzip_copy, options

CRITEO = FIXTURES / "criteo" / "train.txt"
SMALL = {"block_bytes": 1 << 10, "rows_per_shard": 50}  # many pieces and shards


def _same_dataset(a: Path, b: Path) -> None:
    """Everything but the parquet row-group layout is equal; ids compared as bytes."""
    for name in ("meta.json", "frequencies.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert pq.read_table(a / "vocab.parquet").equals(pq.read_table(b / "vocab.parquet"))
    meta_a, meta_b = DatasetMeta.load(a), DatasetMeta.load(b)
    for split in SPLITS:
        assert meta_a.split(split).files == meta_b.split(split).files, split
        for fa, fb in zip(meta_a.files(split), meta_b.files(split), strict=True):
            ta, tb = pq.read_table(fa), pq.read_table(fb)
            assert ta.schema == tb.schema and ta.num_rows == tb.num_rows, fa
            for name in ta.column_names:
                xa, xb = ta[name].combine_chunks(), tb[name].combine_chunks()
                if name in meta_a.sparse_names and hasattr(xa, "flatten"):
                    assert np.array_equal(xa.offsets, xb.offsets), (fa, name)
                    xa, xb = xa.flatten(), xb.flatten()
                assert (
                    xa.to_numpy(zero_copy_only=False).tobytes()
                    == xb.to_numpy(zero_copy_only=False).tobytes()
                ), (fa, name)
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())


def _both(prepare, tmp_path: Path, **overrides) -> tuple[Path, Path]:
    """The dataset prepared by one process and by two workers."""
    one, two = tmp_path / "one", tmp_path / "two"
    prepare(one, options(**SMALL, **overrides))
    prepare(two, options(**SMALL, workers=2, **overrides))
    return one, two


def _criteo_tsv(path: Path, rows: int, seed: int = 0, last_newline: bool = True) -> Path:
    """A Criteo-format TSV with Zipf-like tokens (so ``min_count`` cuts), empty fields, and
    a few malformed lines (short, unparsable number, empty)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        label = str(int(rng.random() < 0.3))
        ints = [str(int(rng.integers(-2, 50))) if rng.random() > 0.2 else "" for _ in range(13)]
        cats = [f"{int(rng.zipf(1.6)) % 400:08x}" if rng.random() > 0.1 else "" for _ in range(26)]
        fields = [label, *ints, *cats]
        if i % 397 == 5:
            fields = fields[:-1]  # wrong column count
        if i % 541 == 7:
            fields[3] = "12x"  # bad number
        lines.append("\t".join(fields) if i % 613 != 9 else "")
    path.write_text("\n".join(lines) + ("\n" if last_newline else ""))
    return path


def test_pieces_start_on_the_lines_they_name(tmp_path):
    path = _criteo_tsv(tmp_path / "train.txt", 600)
    reader = FileReader([TextSource(path, CRITEO_COLUMNS, "\t")])
    opts = options(**SMALL, workers=2)
    passes = ParallelPasses(None, reader, random_split(), opts, tmp_path)
    passes.close()
    pieces = passes.pieces
    assert len(pieces) == 8  # 4 per worker
    data = path.read_bytes()
    stops = [p.span[1] for p in pieces]
    assert [p.span[0] for p in pieces] == [0, *stops[:-1]] and stops[-1] == len(data)
    for p in pieces:
        start, _, first_line = p.span
        assert start == 0 or data[start - 1 : start] == b"\n"
        assert data[:start].count(b"\n") + 1 == first_line


def test_criteo_fixture_days_split(tmp_path):
    one, two = _both(lambda out, o: prepare_criteo([CRITEO], out, options=o), tmp_path, min_count=2)
    _same_dataset(one, two)
    assert DatasetMeta.load(two).bad_rows == DatasetMeta.load(one).bad_rows != {}


def test_generated_criteo_random_split_with_min_count(tmp_path):
    path = _criteo_tsv(tmp_path / "train.txt", 1200, last_newline=False)
    one, two = _both(
        lambda out, o: prepare_criteo([path], out, options=o),
        tmp_path,
        split="random",
        min_count=3,
    )
    _same_dataset(one, two)
    meta = DatasetMeta.load(two)
    assert meta.rows("valid") > 0 and meta.rows("test") > 0
    assert set(meta.bad_rows) == {"wrong_column_count", "bad_number", "empty_row"}


def test_criteo_day_files_plain_and_gzip(tmp_path):
    days = [
        _criteo_tsv(tmp_path / "day_0", 700, seed=1),
        gzip_copy(_criteo_tsv(tmp_path / "raw1", 500, seed=2), tmp_path / "day_1"),
        _criteo_tsv(tmp_path / "day_2", 600, seed=3),
    ]
    one, two = _both(lambda out, o: prepare_criteo(days, out, options=o), tmp_path, min_count=2)
    _same_dataset(one, two)


def test_table_csv_with_header_bom_crlf_quotes_and_buckets(tmp_path):
    rng = np.random.default_rng(5)
    rows = ["clicked,site,ad,price,tags,note"]
    for i in range(1500):
        price = f"{rng.lognormal(1, 1):.2f}" if rng.random() > 0.3 else "0"
        tags = "|".join(f"t{int(x)}" for x in rng.integers(0, 9, size=int(rng.integers(0, 3))))
        label = "maybe" if i % 211 == 3 else str(int(rng.random() < 0.4))
        rows.append(
            f"{label},s{int(rng.zipf(1.5)) % 50},ad{int(rng.integers(0, 30))},{price},{tags},"
            f'"a, {i}"'
        )
    path = tmp_path / "logs.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    schema = TableSchema(
        label="clicked",
        categorical=("site", "ad"),
        numeric=("price",),
        multi_valued={"tags": "|"},
        numeric_buckets=4,
    )
    for split in ("random", "ordered"):
        one, two = _both(
            lambda out, o: prepare_table([path], out, schema, o),
            tmp_path / split,
            split=split,
            min_count=2,
        )
        _same_dataset(one, two)
        assert DatasetMeta.load(two).bad_rows["bad_label"]["count"] == 8


@pytest.mark.parametrize(
    "prepare",
    [
        lambda out, o: prepare_avazu([FIXTURES / "avazu" / "train.csv"], out, options=o),
        lambda out, o: prepare_kdd12([FIXTURES / "kdd12" / "training.txt"], out, options=o),
        lambda out, o: prepare_movielens(FIXTURES / "ml-100k", out, options=o),
    ],
    ids=["avazu", "kdd12", "ml-100k"],
)
def test_other_format_fixtures(tmp_path, prepare):
    one, two = _both(prepare, tmp_path, min_count=1)
    _same_dataset(one, two)


def test_first_bad_row_fails_as_in_one_process_and_keeps_the_old_dataset(tmp_path):
    path = _criteo_tsv(tmp_path / "train.txt", 1200)
    out = tmp_path / "data"
    prepare_criteo([path], out, options=options(**SMALL, split="random"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    errors = []
    for workers in (1, 2):
        o = options(**SMALL, split="random", on_bad_row="fail", overwrite=True, workers=workers)
        with pytest.raises(BadInputError) as e:
            prepare_criteo([path], out, options=o)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and f"{path}:6:" in errors[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "train.txt"]  # no staging


class _DyingFormat(CriteoFormat):
    """Criteo whose transform kills the worker process running it (not the test's)."""

    def transform(self, raw, issues, labeled=True):
        if str(os.getpid()) != os.environ["TEST_PARENT_PID"]:
            os._exit(3)
        return super().transform(raw, issues, labeled)


def test_a_dead_worker_is_one_error_and_keeps_the_old_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_PARENT_PID", str(os.getpid()))  # workers inherit it
    out = tmp_path / "data"
    prepare_criteo([CRITEO], out, options=options(min_count=2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    reader = FileReader([TextSource(CRITEO, CRITEO_COLUMNS, "\t")])
    o = options(**SMALL, split="random", overwrite=True, workers=2)
    with pytest.raises(OSError, match="a --workers process died"):
        prepare_dataset(_DyingFormat(), reader, out, random_split(), o)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_bad_worker_counts_are_refused(tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--workers"):
            prepare_criteo([CRITEO], tmp_path / "x", options=options(workers=bad))
    with pytest.raises(ValueError, match="--executor"):
        prepare_criteo([CRITEO], tmp_path / "x", options=options(executor="spark"))
    assert not (tmp_path / "x").exists()


def test_ray_executor_on_a_local_instance(tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    one = tmp_path / "one"
    two = tmp_path / "ray"
    prepare_criteo([CRITEO], one, options=options(**SMALL, min_count=2))
    # In a child process, as the sweep's Ray test: Ray's helper processes then end with it
    # instead of living on in the test session's process.
    code = (
        "import sys; from tests.helpers.prepare_support import options; "
        "from datasets.readers.criteo import prepare_criteo; "
        f"o = options(**{SMALL!r}, min_count=2, workers=2, executor='ray', address='local'); "
        "prepare_criteo([sys.argv[1]], sys.argv[2], options=o)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", code, str(CRITEO), str(two)], env=env, check=True, timeout=600
    )
    _same_dataset(one, two)


def test_progress_counts_every_line_of_both_passes(tmp_path, capsys):
    path = _criteo_tsv(tmp_path / "train.txt", 1200)
    o = replace(options(**SMALL, split="random", workers=2), progress=True)
    prepare_criteo([path], tmp_path / "data", options=o)
    lines = capsys.readouterr().err.splitlines()
    assert "count (train): 0 rows" in lines and "encode: 0/1,200 rows" in lines
    assert any(x.startswith("count (train): 1,200 rows in") for x in lines)
    assert any(x.startswith("encode: 1,200/1,200 rows in") for x in lines)
