"""Any CSV / TSV / parquet table, described by a schema.

The schema names the label column (0/1, or a probability in [0, 1]), the categorical,
numeric and multi-valued columns (with their separator); other columns are ignored. It comes
from a small JSON file or from command-line flags::

    {"label": "clicked", "categorical": ["site", "ad"], "numeric": ["price"],
     "multi_valued": {"tags": "|"}, "format": "csv", "delimiter": ","}

Numeric columns become dense floats through ``numeric_transform`` (``signed_log1p`` by
default: ``sign(x) * log(|x| + 1)``; ``clamp_log1p`` or ``identity`` also exist); missing = 0.
With ``numeric_buckets: N`` each numeric column ``c`` also (``numeric_as: "both"``, the
default then) or only (``"buckets"``) becomes a categorical field ``c_bucket``: at most N
equal-frequency buckets fitted on the *train* split, with a bucket of its own for 0 when 0 is
the column's most frequent value (see :mod:`datasets.readers.quantiles`); the edges are stored
in ``meta.json`` so :class:`datasets.encode.RawEncoder` buckets raw values identically.

The label is 0/1 or a probability, or text mapped by ``positive`` and ``negative`` (lists of
values; any other value is a bad row): UCI Adult's ``{"positive": [">50K", ">50K."],
"negative": ["<=50K", "<=50K."]}`` (adult.test ends its labels with a period). Surrounding
spaces of text values are removed (``trim``, on by default: UCI files write ``39, State-gov``).
Text files need a header line unless ``columns`` names the columns. In parquet files
multi-valued columns may also be list columns.

Example::

    schema = TableSchema(label="clicked", categorical=("site", "ad"), numeric=("price",))
    meta = prepare_table(["logs.csv"], "data/logs", schema)
    adult = TableSchema(label="income", categorical=("workclass",), numeric=("age",),
                        positive=(">50K", ">50K."), negative=("<=50K", "<=50K."),
                        numeric_buckets=20, header=False, columns=ADULT_COLUMNS)
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from datasets.prepare.base import LABEL, Format, PrepareOptions
from datasets.prepare.columns import (
    DENSE_TRANSFORMS,
    Features,
    Issues,
    as_strings,
    dense_transform,
    parse_named_label,
    parse_numbers,
    parse_unit_label,
    token_lists,
    trim_spaces,
)
from datasets.prepare.engine import prepare_dataset
from datasets.prepare.sources import BadInputError, ParquetSource, TextSource
from datasets.prepare.splits import FileReader, standard_split
from datasets.prepared import DatasetMeta
from datasets.readers.base import Reader, names
from datasets.readers.quantiles import NumericSketch, QuantileBuckets, bucket_field

TABLE_FORMATS = {"csv": ",", "tsv": "\t", "parquet": None}
NUMERIC_AS = ("dense", "buckets", "both")


@dataclass(frozen=True)
class TableSchema:
    """Which columns of a table are the label and which features (see module docstring)."""

    label: str
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    multi_valued: dict[str, str] = field(default_factory=dict)
    format: str | None = None
    delimiter: str | None = None
    header: bool = True
    columns: tuple[str, ...] | None = None
    numeric_transform: str = "signed_log1p"
    numeric_buckets: int = 0
    numeric_as: str | None = None  # None: "both" with numeric_buckets, else "dense"
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    trim: bool = True

    def __post_init__(self) -> None:
        for name in ("categorical", "numeric", "columns", "positive", "negative"):
            value = getattr(self, name)
            if isinstance(value, str):  # a lone string is one value, not its characters
                value = (value,)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.numeric_as is None:
            object.__setattr__(self, "numeric_as", "both" if self.numeric_buckets else "dense")
        self._check_numeric_options()
        self._check_label_values()
        features = [*self.categorical, *self.numeric, *self.multi_valued]
        if not features:
            raise ValueError("the schema names no categorical, numeric or multi-valued column")
        repeated = sorted(
            {c for c in [self.label, *features] if [self.label, *features].count(c) > 1}
        )
        if repeated:
            raise ValueError(f"columns {repeated} appear more than once in the schema")
        if LABEL in features:
            raise ValueError(f"a feature may not be called {LABEL!r} (the prepared label column)")
        if self.format is not None and self.format not in TABLE_FORMATS:
            raise ValueError(f"format must be one of {sorted(TABLE_FORMATS)}, got {self.format!r}")
        if self.numeric_transform not in DENSE_TRANSFORMS:
            raise ValueError(f"numeric_transform must be one of {sorted(DENSE_TRANSFORMS)}")
        if not self.header and not self.columns:
            raise ValueError("a file without a header line needs `columns`")
        derived = [bucket_field(c) for c in self.numeric if self.numeric_buckets]
        clash = sorted(set(derived) & {self.label, *features})
        if clash:
            raise ValueError(f"bucket fields {clash} clash with columns of the same name")

    def _check_numeric_options(self) -> None:
        if self.numeric_as not in NUMERIC_AS:
            raise ValueError(f"numeric_as must be one of {NUMERIC_AS}, got {self.numeric_as!r}")
        if not isinstance(self.numeric_buckets, int) or self.numeric_buckets < 0:
            raise ValueError(
                f"numeric_buckets must be an integer >= 0, got {self.numeric_buckets!r}"
            )
        if self.numeric_buckets == 1:
            raise ValueError("numeric_buckets must be at least 2 (or 0: no buckets)")
        if (self.numeric_as == "dense") != (self.numeric_buckets == 0):
            raise ValueError(
                f"numeric_as {self.numeric_as!r} needs numeric_buckets "
                + ("0" if self.numeric_as == "dense" else ">= 2")
                + f", got {self.numeric_buckets}"
            )

    def _check_label_values(self) -> None:
        if bool(self.positive) != bool(self.negative):
            given, missing = ("positive", "negative") if self.positive else ("negative", "positive")
            raise ValueError(
                f"label values: `{given}` needs `{missing}` too (every label value must be "
                "one or the other; others are bad rows)"
            )
        both = sorted(set(self.positive) & set(self.negative))
        if both:
            raise ValueError(f"label values {both} are both positive and negative")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "schema") -> TableSchema:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
        if "label" not in raw:
            raise ValueError(f"{where}: no `label`")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TableSchema:
        return cls.from_dict(read_schema_file(path), where=str(path))


def read_schema_file(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a schema file, not yet validated (flags may still complete it)."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a schema is a JSON object, got {type(raw).__name__}")
    return raw


class TableFormat(Format):
    """A table described by a :class:`TableSchema`; ``buckets`` are fitted quantile buckets
    (from ``meta.json``), or empty until :meth:`fit` when preparing."""

    name = "table"

    def __init__(
        self, config: TableSchema, buckets: dict[str, QuantileBuckets] | None = None
    ) -> None:
        super().__init__(config)
        self.label_columns = (config.label,)
        self.columns = [config.label, *config.categorical, *config.numeric, *config.multi_valued]
        self.bucketed = list(config.numeric) if config.numeric_buckets else []
        self.dense = list(config.numeric) if config.numeric_as in ("dense", "both") else []
        self.sparse = [
            *config.categorical,
            *config.multi_valued,
            *(bucket_field(c) for c in self.bucketed),
        ]
        self.multi_valued = dict(config.multi_valued)
        self.buckets = dict(buckets or {})
        self._sketches = {c: NumericSketch(seed=c) for c in self.bucketed}

    @property
    def fitted_fields(self) -> list[str]:
        return [bucket_field(c) for c in self.bucketed]

    @property
    def sources(self) -> dict[str, str]:
        own = {c: c for c in [*self.dense, *self.config.categorical, *self.multi_valued]}
        return own | {bucket_field(c): c for c in self.bucketed}

    def observe(self, features: Features, train: np.ndarray) -> None:
        for c in self.bucketed:
            self._sketches[c].add(features.numbers[c][train])

    def fit(self) -> dict[str, list[str]]:
        self.buckets = {c: s.fit(self.config.numeric_buckets) for c, s in self._sketches.items()}
        return {bucket_field(c): list(b.order) for c, b in self.buckets.items()}

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.buckets:
            described["config"]["buckets"] = {c: b.to_json() for c, b in self.buckets.items()}
        return described

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TableFormat:
        config = dict(config)
        config.setdefault("trim", False)  # recorded before trimming existed: it did not trim
        recorded = config.pop("buckets", {})
        schema = TableSchema.from_dict(config)
        if sorted(recorded) != sorted(schema.numeric if schema.numeric_buckets else []):
            raise ValueError(
                f"table config: buckets recorded for {sorted(recorded)}, "
                f"expected {sorted(schema.numeric) if schema.numeric_buckets else []}"
            )
        buckets = {
            c: QuantileBuckets.from_json(b, where=f"table config buckets {c!r}")
            for c, b in recorded.items()
        }
        return cls(schema, buckets)

    def transform(self, raw: pa.Table, issues: Issues, labeled: bool = True) -> Features:
        cfg = self.config
        label = None
        if labeled and cfg.positive:
            label = parse_named_label(
                self._column(raw, cfg.label), cfg.label, cfg.positive, cfg.negative, issues
            )
        elif labeled:
            label = parse_unit_label(self._column(raw, cfg.label), cfg.label, issues)
        return self._features(raw, issues, label, self.columns)

    def transform_columns(self, raw: pa.Table, issues: Issues) -> Features:
        return self._features(raw, issues, None, set(raw.column_names))

    def _column(self, raw: pa.Table, name: str) -> pa.Array:
        return trim_spaces(raw[name]) if self.config.trim else raw[name]

    def _features(
        self, raw: pa.Table, issues: Issues, label: np.ndarray | None, have: Collection[str]
    ) -> Features:
        cfg = self.config
        numbers = {
            c: parse_numbers(self._column(raw, c), c, issues) for c in cfg.numeric if c in have
        }
        dense = {
            c: dense_transform(cfg.numeric_transform, numbers[c]) for c in self.dense if c in have
        }
        tokens = {c: as_strings(self._column(raw, c)) for c in cfg.categorical if c in have}
        tokens.update(
            {
                c: token_lists(self._column(raw, c), sep)
                for c, sep in cfg.multi_valued.items()
                if c in have
            }
        )
        if self.buckets:  # empty while pass 1 is still sketching the train values
            tokens.update(
                {
                    bucket_field(c): self.buckets[c].tokens(numbers[c])
                    for c in self.bucketed
                    if c in have
                }
            )
        bucketed = {c: numbers[c] for c in self.bucketed if c in have}
        return Features(label, dense, tokens, numbers=bucketed)


def prepare_table(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    schema: TableSchema,
    options: PrepareOptions | None = None,
) -> DatasetMeta:
    """Prepares CSV / TSV / parquet files described by ``schema`` (``options.split``:
    ``random`` (default) or ``ordered``; ``options.min_count`` defaults to 1)."""
    options = (options or PrepareOptions()).with_defaults(min_count=1, split="random")
    fmt = TableFormat(schema)
    reader = FileReader([_source(Path(p), schema, fmt.columns) for p in paths])
    for source in reader.sources:
        present = source.columns if isinstance(source, TextSource) else source.read_header()
        missing = [c for c in fmt.columns if c not in present]
        if missing:
            raise BadInputError(f"{source.path}: no columns {missing}; it has {present}")
    return prepare_dataset(fmt, reader, out, standard_split(reader, options), options)


def _source(path: Path, schema: TableSchema, needed: list[str]) -> TextSource | ParquetSource:
    kind = schema.format or _format_of(path)
    if kind == "parquet":
        return ParquetSource(path, needed)
    delimiter = schema.delimiter or TABLE_FORMATS[kind]
    probe = TextSource(path, [], delimiter, header=True, quoted=True)
    columns = list(schema.columns) if schema.columns else probe.read_header()
    if len(set(columns)) != len(columns):
        raise BadInputError(f"{path}:1: repeated column names in {columns}")
    return TextSource(
        path,
        columns,
        delimiter,
        header=schema.header,
        quoted=True,
        include=[c for c in needed if c in columns],
    )


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz", ".gzip")]
    last = suffixes[-1] if suffixes else ""
    by_suffix = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".txt": "tsv",
        ".tab": "tsv",
        ".parquet": "parquet",
        ".pq": "parquet",
    }
    if last not in by_suffix:
        raise BadInputError(f"{path}: cannot tell the format from the name; give --format")
    return by_suffix[last]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="CSV / TSV / parquet files")
    p.add_argument("--schema", help="JSON schema file (flags below override its entries)")
    p.add_argument("--label", help="label column (0/1, a probability, or text: see --positive)")
    p.add_argument(
        "--positive",
        action="append",
        metavar="VALUE",
        help="label text meaning 1, e.g. '>50K' (repeatable; needs --negative; other values "
        "are bad rows)",
    )
    p.add_argument(
        "--negative",
        action="append",
        metavar="VALUE",
        help="label text meaning 0, e.g. '<=50K' (repeatable)",
    )
    p.add_argument("--categorical", type=names, help="comma-separated categorical columns")
    p.add_argument("--numeric", type=names, help="comma-separated numeric columns")
    p.add_argument(
        "--multi",
        action="append",
        type=_multi,
        metavar="COL:SEP",
        help="multi-valued column and its separator, e.g. tags:'|' (repeatable)",
    )
    p.add_argument("--format", choices=sorted(TABLE_FORMATS), help="default: from the file name")
    p.add_argument("--delimiter", help="field delimiter of text files (default per format)")
    p.add_argument(
        "--columns",
        type=names,
        help="comma-separated column names of text files without a header line",
    )
    p.add_argument(
        "--numeric-transform",
        choices=sorted(DENSE_TRANSFORMS),
        help="transform of numeric columns (default signed_log1p)",
    )
    p.add_argument(
        "--numeric-buckets",
        type=int,
        metavar="N",
        help="also give each numeric column COL a categorical field COL_bucket: N "
        "equal-frequency buckets from the train split (0 its own bucket when it is the "
        "most frequent value)",
    )
    p.add_argument(
        "--numeric-as",
        choices=NUMERIC_AS,
        help="numeric columns as dense values, buckets, or both (default: both with "
        "--numeric-buckets, else dense)",
    )


def _schema(args: argparse.Namespace) -> TableSchema:
    raw = read_schema_file(args.schema) if args.schema else {}
    flags = {
        "label": args.label,
        "categorical": args.categorical,
        "numeric": args.numeric,
        "multi_valued": dict(args.multi) if args.multi else None,
        "format": args.format,
        "delimiter": args.delimiter,
        "numeric_transform": args.numeric_transform,
        "numeric_buckets": args.numeric_buckets,
        "numeric_as": args.numeric_as,
        "positive": args.positive,
        "negative": args.negative,
    }
    if args.columns is not None:  # naming the columns means the file has no header line
        flags.update(columns=args.columns, header=False)
    raw.update({k: v for k, v in flags.items() if v is not None})
    return TableSchema.from_dict(raw, where=args.schema or "command line")


def _multi(text: str) -> tuple[str, str]:
    name, sep, separator = text.partition(":")
    if not sep or not name or not separator:
        raise argparse.ArgumentTypeError(f"expected COL:SEP, e.g. tags:'|', got {text!r}")
    return name, separator


READER = Reader(
    name="table",
    format=TableFormat,
    help="any CSV/TSV/parquet with a schema (JSON file or flags)",
    example="ctr prepare table logs.csv --out data/logs --schema schema.json\n"
    "  ctr prepare table logs.parquet --out data/logs --label clicked "
    "--categorical site,ad --numeric price --multi tags:'|'\n"
    "  ctr prepare table adult.data adult.test --out data/adult --format csv "
    "--columns age,workclass,fnlwgt,education,education-num,marital-status,occupation,"
    "relationship,race,sex,capital-gain,capital-loss,hours-per-week,native-country,income "
    "--label income --positive '>50K' --positive '>50K.' --negative '<=50K' "
    "--negative '<=50K.' --categorical workclass,education,marital-status,occupation,"
    "relationship,race,sex,native-country --numeric age,fnlwgt,education-num,capital-gain,"
    "capital-loss,hours-per-week --numeric-buckets 20 --numeric-as buckets",
    add_arguments=_arguments,
    prepare=lambda a, o: prepare_table(a.paths, a.out, _schema(a), o),
)
