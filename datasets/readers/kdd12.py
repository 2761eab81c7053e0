"""KDD Cup 2012 track 2 (search ads): ``training.txt``, tab-separated, no header.

Columns: click, impression, display URL, ad, advertiser, depth, position, query,
keyword, title, description, user; the ten ids are categorical fields.

The label comes from clicks vs impressions: ``expanded`` (default) turns a line with
``impression = n`` and ``click = c`` into n rows, c of them clicked (the empirical CTR
of each line is kept); ``binary`` keeps one row per line labelled ``click > 0``. All rows
of one line fall into the same split. A line needs integers ``0 <= click <= impression``
and ``impression >= 1``, else it is a ``bad_label``.

Example::

    meta = prepare_kdd12(["track2/training.txt"], "data/kdd12", Kdd12Config(label="binary"))
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from datasets.prepare.base import Format, PrepareOptions
from datasets.prepare.columns import Features, Issues, parse_numbers
from datasets.prepare.engine import prepare_dataset
from datasets.prepare.sources import TextSource
from datasets.prepare.splits import FileReader, standard_split
from datasets.prepared import DatasetMeta
from datasets.readers.base import Reader

KDD12_FEATURES = (
    "display_url,ad_id,advertiser_id,depth,position,query_id,keyword_id,title_id,"
    "description_id,user_id"
).split(",")
KDD12_COLUMNS = ["click", "impression", *KDD12_FEATURES]
LABEL_MODES = ("expanded", "binary")
DEFAULT_MIN_COUNT = 10  # the AutoInt KDD12 protocol


@dataclass(frozen=True)
class Kdd12Config:
    label: str = "expanded"

    def __post_init__(self) -> None:
        if self.label not in LABEL_MODES:
            raise ValueError(f"kdd12 label must be one of {LABEL_MODES}, got {self.label!r}")


class Kdd12Format(Format):
    name = "kdd12"
    label_columns = ("click", "impression")

    def __init__(self, config: Kdd12Config = Kdd12Config()) -> None:
        super().__init__(config)
        self.columns = KDD12_COLUMNS
        self.dense = []
        self.sparse = KDD12_FEATURES

    @property
    def sources(self) -> dict[str, str]:
        return {f: f for f in self.sparse}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Kdd12Format:
        return cls(Kdd12Config(**config))

    def transform(self, raw: pa.Table, issues: Issues, labeled: bool = True) -> Features:
        tokens = {c: raw[c] for c in KDD12_FEATURES}
        if not labeled:
            return Features(None, {}, tokens)
        clicks = parse_numbers(raw["click"], "click", issues, reason="bad_label")
        shown = parse_numbers(raw["impression"], "impression", issues, reason="bad_label")
        with np.errstate(invalid="ignore"):
            for name, x, values in (
                ("click", clicks, raw["click"]),
                ("impression", shown, raw["impression"]),
            ):
                issues.flag("bad_label", name, ~(x >= 0) | (x != np.floor(x)), values)
            issues.flag(
                "bad_label", "impression", ~(shown >= 1) | ~(clicks <= shown), raw["impression"]
            )
        ok = ~issues.bad_mask()
        clicks, shown = (
            np.where(ok, clicks, 0).astype(np.int64),
            np.where(ok, shown, 0).astype(np.int64),
        )
        if self.config.label == "binary":
            return Features((clicks > 0).astype(np.float32), {}, tokens)
        source_rows = np.repeat(np.arange(len(shown)), shown)
        first = np.cumsum(shown) - shown
        rank = np.arange(len(source_rows)) - first[source_rows]  # impression index within its line
        label = (rank < clicks[source_rows]).astype(np.float32)
        take = pa.array(source_rows)
        return Features(label, {}, {c: t.take(take) for c, t in tokens.items()}, source_rows)


def prepare_kdd12(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: Kdd12Config | None = None,
    options: PrepareOptions | None = None,
) -> DatasetMeta:
    """Prepares KDD Cup 2012 track 2 ``training.txt`` (``options.split``: ``random``
    (default) or ``ordered``; ``options.min_count`` defaults to 10)."""
    options = (options or PrepareOptions()).with_defaults(
        min_count=DEFAULT_MIN_COUNT, split="random"
    )
    fmt = Kdd12Format(config or Kdd12Config())
    reader = FileReader([TextSource(p, KDD12_COLUMNS, "\t") for p in paths])
    return prepare_dataset(fmt, reader, out, standard_split(reader, options), options)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="training.txt (plain or .gz)")
    p.add_argument(
        "--label",
        choices=LABEL_MODES,
        default="expanded",
        help="expanded: one row per impression; binary: one row per line, click > 0",
    )


READER = Reader(
    name="kdd12",
    format=Kdd12Format,
    help="KDD Cup 2012 track 2 training.txt (TSV; clicks vs impressions)",
    example="ctr prepare kdd12 track2/training.txt --out data/kdd12 --label binary",
    add_arguments=_arguments,
    prepare=lambda a, o: prepare_kdd12(a.paths, a.out, Kdd12Config(a.label), o),
    min_count=DEFAULT_MIN_COUNT,
)
