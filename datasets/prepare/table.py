"""Any CSV / TSV / parquet table, described by a schema.

The schema names the label column (0/1, or a probability in [0, 1]), the categorical,
numeric and multi-valued columns (with their separator); other columns are ignored. It comes
from a small JSON file or from command-line flags::

    {"label": "clicked", "categorical": ["site", "ad"], "numeric": ["price"],
     "multi_valued": {"tags": "|"}, "format": "csv", "delimiter": ","}

Numeric columns become dense floats through ``numeric_transform`` (``signed_log1p`` by
default: ``sign(x) * log(|x| + 1)``; ``clamp_log1p`` or ``identity`` also exist); missing = 0.
Text files need a header line unless ``columns`` names the columns. In parquet files
multi-valued columns may also be list columns.

Example::

    schema = TableSchema(label="clicked", categorical=("site", "ad"), numeric=("price",))
    meta = prepare_table(["logs.csv"], "data/logs", schema)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa

from datasets.format import DatasetMeta
from datasets.prepare.columns import (
    DENSE_TRANSFORMS,
    Features,
    Issues,
    as_strings,
    dense_transform,
    parse_numbers,
    parse_unit_label,
    token_lists,
)
from datasets.prepare.common import (
    LABEL,
    FileReader,
    Format,
    PrepareOptions,
    prepare_dataset,
    standard_split,
)
from datasets.prepare.sources import BadInputError, ParquetSource, TextSource

TABLE_FORMATS = {"csv": ",", "tsv": "\t", "parquet": None}


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

    def __post_init__(self) -> None:
        for name in ("categorical", "numeric", "columns"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
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
    name = "table"

    def __init__(self, config: TableSchema) -> None:
        super().__init__(config)
        self.label_columns = (config.label,)
        self.columns = [config.label, *config.categorical, *config.numeric, *config.multi_valued]
        self.dense = list(config.numeric)
        self.sparse = [*config.categorical, *config.multi_valued]
        self.multi_valued = dict(config.multi_valued)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TableFormat:
        return cls(TableSchema.from_dict(config))

    def transform(self, raw: pa.Table, issues: Issues, labeled: bool = True) -> Features:
        cfg = self.config
        label = parse_unit_label(raw[cfg.label], cfg.label, issues) if labeled else None
        dense = {
            c: dense_transform(cfg.numeric_transform, parse_numbers(raw[c], c, issues))
            for c in cfg.numeric
        }
        tokens = {c: as_strings(raw[c]) for c in cfg.categorical}
        tokens.update({c: token_lists(raw[c], sep) for c, sep in cfg.multi_valued.items()})
        return Features(label, dense, tokens)


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
