"""Helpers shared by the ``test_prepare_*`` modules (fixture paths, reading prepared splits)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datasets.prepare import PrepareOptions
from datasets.prepared import SPLITS, DatasetMeta, load_vocab
from tests.helpers import FIXTURES  # noqa: F401 (re-exported)


def options(**overrides) -> PrepareOptions:
    """Quiet options for tests: no progress bars; the fixtures pack several bad rows into a
    few dozen lines, so more of them may be dropped than the 5% a real run allows."""
    return PrepareOptions(progress=False, **{"max_dropped_fraction": 0.25, **overrides})


def read_split(out: Path, split: str) -> pa.Table:
    meta = DatasetMeta.load(out)
    return pa.concat_tables([pq.read_table(f) for f in meta.files(split)])


def read_all_splits(out: Path) -> pa.Table:
    """train, valid and test rows concatenated in that order."""
    return pa.concat_tables([read_split(out, s) for s in SPLITS])


def decode(out: Path, field: str, ids: list[int]) -> list[str | None]:
    """Raw values of ``ids`` through vocab.parquet (None for OOV id 0)."""
    inverse = {i: v for v, i in load_vocab(out)[field].items()}
    return [inverse.get(i) for i in ids]


def gzip_copy(src: Path, dst: Path) -> Path:
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
    return dst
