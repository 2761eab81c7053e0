"""Avazu click-through prediction: ``train.csv`` (comma-separated, with a header line).

``id`` is dropped; ``click`` is the label; ``hour`` (``YYMMDDHH``) becomes two categorical
fields, ``hour_of_day`` (``"0"``..``"23"``) and ``weekday`` (``"0"`` = Monday ..
``"6"``); every other column is categorical as is. A malformed ``hour`` is a ``bad_value``.

Example::

    meta = prepare_avazu(["train.csv.gz"], "data/avazu")
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets.prepare.base import Format, PrepareOptions
from datasets.prepare.columns import Features, Issues, as_array, parse_binary_label
from datasets.prepare.engine import prepare_dataset
from datasets.prepare.sources import BadInputError, TextSource
from datasets.prepare.splits import FileReader, standard_split
from datasets.prepared import DatasetMeta
from datasets.readers.base import Reader

AVAZU_COLUMNS = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
    "app_category,device_id,device_ip,device_model,device_type,device_conn_type,"
    "C14,C15,C16,C17,C18,C19,C20,C21"
).split(",")
HOUR_FORMAT = "%y%m%d%H"
DEFAULT_MIN_COUNT = 5  # the AutoInt / FuxiCTR Avazu protocol


@dataclass(frozen=True)
class AvazuConfig:
    """Avazu has no options yet; the class keeps the format's shape uniform."""


class AvazuFormat(Format):
    name = "avazu"
    label_columns = ("click",)
    dropped_columns = ("id",)

    def __init__(self, config: AvazuConfig = AvazuConfig()) -> None:
        super().__init__(config)
        self.columns = AVAZU_COLUMNS
        self.dense = []
        self.categorical = [c for c in AVAZU_COLUMNS if c not in ("id", "click", "hour")]
        self.sparse = ["hour_of_day", "weekday", *self.categorical]

    @property
    def sources(self) -> dict[str, str]:
        return {"hour_of_day": "hour", "weekday": "hour"} | {c: c for c in self.categorical}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AvazuFormat:
        return cls(AvazuConfig(**config))

    def transform(self, raw: pa.Table, issues: Issues, labeled: bool = True) -> Features:
        label = parse_binary_label(raw["click"], "click", issues) if labeled else None
        return self._features(raw, issues, label, AVAZU_COLUMNS)

    def transform_columns(self, raw: pa.Table, issues: Issues) -> Features:
        return self._features(raw, issues, None, set(raw.column_names))

    def _features(
        self, raw: pa.Table, issues: Issues, label: np.ndarray | None, have: Collection[str]
    ) -> Features:
        tokens = {}
        if "hour" in have:
            hour_of_day, weekday = split_hour(as_array(raw["hour"]), issues)
            tokens = {"hour_of_day": hour_of_day, "weekday": weekday}
        tokens.update({c: raw[c] for c in self.categorical if c in have})
        return Features(label, {}, tokens)


def split_hour(hour: pa.Array, issues: Issues) -> tuple[pa.Array, pa.Array]:
    """``YYMMDDHH`` strings -> (hour of day, weekday with Monday = 0) as string tokens."""
    hour = pc.cast(hour, pa.string()) if not pa.types.is_string(hour.type) else hour
    stamp = pc.strptime(hour, format=HOUR_FORMAT, unit="s", error_is_null=True)
    # strptime is lenient (7 digits, 29 February 2014 rolling over); only exact round trips count.
    exact = pc.equal(pc.strftime(stamp, format=HOUR_FORMAT), hour).fill_null(False)
    malformed = pc.and_(hour.is_valid(), pc.invert(exact)).to_numpy(zero_copy_only=False)
    issues.flag("bad_value", "hour", malformed, hour)
    stamp = pc.if_else(exact, stamp, pa.nulls(len(stamp), stamp.type))
    return pc.hour(stamp).cast(pa.string()), pc.day_of_week(stamp).cast(pa.string())


def prepare_avazu(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    options: PrepareOptions | None = None,
) -> DatasetMeta:
    """Prepares Avazu CSV files (``options.split``: ``random`` (default) or ``ordered``;
    ``options.min_count`` defaults to 5)."""
    options = (options or PrepareOptions()).with_defaults(
        min_count=DEFAULT_MIN_COUNT, split="random"
    )
    fmt = AvazuFormat()
    sources = [
        TextSource(p, AVAZU_COLUMNS, ",", header=True, include=AVAZU_COLUMNS[1:]) for p in paths
    ]
    reader = FileReader(sources)
    for s in sources:
        header = s.read_header()
        if header != AVAZU_COLUMNS:
            hint = " (Avazu's test.csv has no click labels)" if "click" not in header else ""
            raise BadInputError(f"{s.path}:1: header is {header}, expected {AVAZU_COLUMNS}{hint}")
    return prepare_dataset(fmt, reader, out, standard_split(reader, options), options)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="train.csv (plain or .gz)")


READER = Reader(
    name="avazu",
    format=AvazuFormat,
    help="Avazu train.csv (CSV with header; hour -> hour_of_day and weekday)",
    example="ctr prepare avazu train.csv --out data/avazu --split random --seed 0",
    add_arguments=_arguments,
    prepare=lambda a, o: prepare_avazu(a.paths, a.out, o),
    min_count=DEFAULT_MIN_COUNT,
)
