"""Criteo display advertising: Kaggle ``train.txt`` and the terabyte ``day_0 … day_23``.

Each line: label, 13 integer features I1..I13, 26 hexadecimal categorical features
C1..C26, tab-separated; any field may be empty. Plain or gzip files.

- Dense: ``log(x + 1)`` with negatives clamped to 0 first (I2 holds -1..-3), as DLRM does;
  a missing value is 0.
- ``bucketize_dense`` also adds categorical fields ``I1_bucket``..``I13_bucket`` with the
  standard rule: ``floor(log(x)^2)`` for x > 2, else ``int(x)``; missing = OOV.
- Split ``days`` (default): one file is Kaggle's 7 days in order, cut by row position as
  DLRM does (days of ``N // 7`` rows, the first ``N % 7`` one row longer); days 1–6 train,
  day 7's first half valid, second half test. Several files are days themselves: by default
  all but the last train and the last halved into valid/test; ``train_days``/``valid_days``/
  ``test_days`` choose (a day in both valid and test is halved, valid first).

Example::

    meta = prepare_criteo(["train.txt"], "data/criteo", options=PrepareOptions(min_count=10))
    meta = prepare_criteo([f"day_{d}.gz" for d in range(24)], "data/criteo-tb",
                          days=CriteoDays(train=range(23), valid=[23], test=[23]))
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from datasets.prepare.base import Format, PrepareOptions
from datasets.prepare.columns import (
    Features,
    Issues,
    dense_transform,
    log_square_buckets,
    parse_binary_label,
    parse_numbers,
)
from datasets.prepare.engine import prepare_dataset
from datasets.prepare.sources import BadInputError, TextSource
from datasets.prepare.splits import (
    END_OF_SOURCE,
    FileReader,
    SplitPlan,
    count_rows,
    global_ranges,
    standard_split,
)
from datasets.prepared import DatasetMeta
from datasets.readers.base import Reader

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label", *CRITEO_DENSE, *CRITEO_SPARSE]
DEFAULT_MIN_COUNT = 10  # the AutoInt / FuxiCTR Criteo protocol


@dataclass(frozen=True)
class CriteoConfig:
    bucketize_dense: bool = False
    dense_transform: str = "clamp_log1p"


@dataclass(frozen=True)
class CriteoDays:
    """Which days (numbers from ``day_N`` file names, else positions in the list) go where.

    ``None`` fields take the default: the last day halved into valid and test, the rest train.
    """

    train: Sequence[int] | None = None
    valid: Sequence[int] | None = None
    test: Sequence[int] | None = None


class CriteoFormat(Format):
    name = "criteo"
    label_columns = ("label",)

    def __init__(self, config: CriteoConfig = CriteoConfig()) -> None:
        super().__init__(config)
        self.columns = CRITEO_COLUMNS
        self.dense = CRITEO_DENSE
        self.buckets = [f"{d}_bucket" for d in CRITEO_DENSE] if config.bucketize_dense else []
        self.sparse = CRITEO_SPARSE + self.buckets

    @property
    def sources(self) -> dict[str, str]:
        own = {c: c for c in [*self.dense, *CRITEO_SPARSE]}
        return own | {f"{d}_bucket": d for d in self.dense if self.buckets}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CriteoFormat:
        return cls(CriteoConfig(**config))

    def transform(self, raw: pa.Table, issues: Issues, labeled: bool = True) -> Features:
        label = parse_binary_label(raw["label"], "label", issues) if labeled else None
        return self._features(raw, issues, label, CRITEO_COLUMNS)

    def transform_columns(self, raw: pa.Table, issues: Issues) -> Features:
        return self._features(raw, issues, None, set(raw.column_names))

    def _features(
        self, raw: pa.Table, issues: Issues, label: np.ndarray | None, have: Collection[str]
    ) -> Features:
        numbers = {d: parse_numbers(raw[d], d, issues) for d in CRITEO_DENSE if d in have}
        dense = {d: dense_transform(self.config.dense_transform, x) for d, x in numbers.items()}
        tokens = {c: raw[c] for c in CRITEO_SPARSE if c in have}
        for d, b in zip(CRITEO_DENSE, self.buckets, strict=False):
            if d in have:
                tokens[b] = log_square_buckets(numbers[d])
        return Features(label, dense, tokens)


def prepare_criteo(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: CriteoConfig | None = None,
    days: CriteoDays | None = None,
    options: PrepareOptions | None = None,
) -> DatasetMeta:
    """Prepares Criteo TSV files; ``options.split`` is ``days`` (default), ``random`` or
    ``ordered``; ``options.min_count`` defaults to 10."""
    fmt = CriteoFormat(config or CriteoConfig())
    reader = FileReader([TextSource(p, CRITEO_COLUMNS, "\t") for p in paths])
    options = (options or PrepareOptions()).with_defaults(min_count=DEFAULT_MIN_COUNT, split="days")
    if options.split == "days":
        plan = _day_split(reader, days or CriteoDays(), options)
    else:
        plan = standard_split(reader, options)
    return prepare_dataset(fmt, reader, out, plan, options)


def kaggle_day_bounds(rows: int) -> list[int]:
    """Start positions of Kaggle's 7 days and the end: DLRM's ``divmod(rows, 7)`` rule."""
    per_day, extra = divmod(rows, 7)
    sizes = [per_day + (1 if d < extra else 0) for d in range(7)]
    return [sum(sizes[:d]) for d in range(8)]


def _day_split(reader: FileReader, days: CriteoDays, options: PrepareOptions) -> SplitPlan:
    n = len(reader.sources)
    if n == 1:
        (rows,) = count_rows(reader, [0], options)
        b = kaggle_day_bounds(rows)
        half = b[6] + (b[7] - b[6] + 1) // 2
        return global_ranges(
            [rows],
            [(0, b[6], "train"), (b[6], half, "valid"), (half, rows, "test")],
            kind="days",
            protocol="kaggle-7-days",
        )
    numbers = _day_numbers(reader.paths)
    last = numbers[-1]
    chosen = {
        "train": set(days.train) if days.train is not None else set(numbers[:-1]),
        "valid": set(days.valid) if days.valid is not None else {last},
        "test": set(days.test) if days.test is not None else {last},
    }
    unknown = sorted(set().union(*chosen.values()) - set(numbers))
    if unknown:
        raise BadInputError(f"days {unknown} are not among the given files' days {numbers}")
    if chosen["train"] & (chosen["valid"] | chosen["test"]):
        raise BadInputError(
            f"days {sorted(chosen['train'] & (chosen['valid'] | chosen['test']))} "
            "are both train and valid/test"
        )
    halved = [i for i, d in enumerate(numbers) if d in chosen["valid"] and d in chosen["test"]]
    halved_rows = dict(zip(halved, count_rows(reader, halved, options), strict=True))
    ranges = []
    for i, d in enumerate(numbers):
        if i in halved_rows:
            rows = halved_rows[i]
            half = (rows + 1) // 2
            ranges.append([(0, half, "valid"), (half, rows, "test")])
        else:
            own = [s for s in ("train", "valid", "test") if d in chosen[s]]
            ranges.append([(0, END_OF_SOURCE, own[0])] if own else [])
    return SplitPlan(
        "days",
        ranges=ranges,
        description={
            "protocol": "day-files",
            "days": numbers,
            **{s: sorted(v) for s, v in chosen.items()},
        },
    )


def _day_numbers(paths: list[str]) -> list[int]:
    """Day numbers from ``day_N`` names, or 0..n-1 by position when the names say nothing."""
    found = [re.match(r"day_(\d+)", Path(p).name) for p in paths]
    if all(found):
        numbers = [int(m.group(1)) for m in found]
        if len(set(numbers)) == len(numbers):
            return numbers
    return list(range(len(paths)))


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="train.txt, or day_N files in order")
    p.add_argument(
        "--bucketize-dense",
        action="store_true",
        help="also add I1_bucket..I13_bucket categorical fields (floor(log(x)^2))",
    )
    for split in ("train", "valid", "test"):
        p.add_argument(
            f"--{split}-days",
            type=_day_list,
            default=None,
            metavar="DAYS",
            help=f"day files for {split}, e.g. 0-22 or 21,22 (numbers from day_N names)",
        )


def _day_list(text: str) -> list[int]:
    days: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            days += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected days like 0-22 or 21,22, got {text!r}") from e
    return days


READER = Reader(
    name="criteo",
    format=CriteoFormat,
    help="Criteo Kaggle train.txt or terabyte day_N files (TSV, plain or .gz)",
    example="ctr prepare criteo train.txt --out data/criteo --min-count 10\n"
    "  ctr prepare criteo day_{0..23}.gz --out data/criteo-tb --valid-days 23 --test-days 23",
    add_arguments=_arguments,
    prepare=lambda a, o: prepare_criteo(
        a.paths,
        a.out,
        CriteoConfig(bucketize_dense=a.bucketize_dense),
        CriteoDays(a.train_days, a.valid_days, a.test_days),
        o,
    ),
    splits=("days", "random", "ordered"),
    min_count=DEFAULT_MIN_COUNT,
)
