"""Raw feature values -> exactly the dense floats and sparse ids preprocessing produced.

Serving receives raw values ("C1": "68fd1e64", "I2": -1, "genres": ["Comedy"], "hour":
"14102100"); :class:`RawEncoder` runs the dataset format's own vectorised transform (the
one ``ctr prepare`` ran, rebuilt from ``meta.json``) and looks the tokens up in
``vocab.parquet``, so a record encodes to the same row the prepared split holds (numeric
buckets of ``prepare table`` use the bin edges that ``meta.json`` records).
Missing fields are missing values (OOV / 0); unknown fields and malformed values raise.

Example::

    encoder = RawEncoder.load("data/criteo")
    encoded = encoder.encode([{"I1": 3, "I2": -1, "C1": "68fd1e64"}])
    encoded.dense, encoded.sparse["C1"], encoded.to_batch()
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from datasets.format import VOCAB_FILE, DatasetMeta, PreparedDataError
from datasets.prepare.avazu import AvazuFormat
from datasets.prepare.columns import Issues
from datasets.prepare.common import FieldVocab, Format
from datasets.prepare.criteo import CriteoFormat
from datasets.prepare.kdd12 import Kdd12Format
from datasets.prepare.movielens import MovieLensFormat
from datasets.prepare.table import TableFormat, TableSchema

FORMATS: dict[str, type[Format]] = {
    f.name: f for f in (CriteoFormat, AvazuFormat, Kdd12Format, MovieLensFormat, TableFormat)
}


@dataclass
class EncodedRecords:
    """Encoded records: dense ``[n, len(meta.dense)]`` and, per sparse field, int64 ids
    ``[n]`` (single-hot) or a list of n id arrays (multi-hot)."""

    dense: np.ndarray
    sparse: dict[str, np.ndarray | list[np.ndarray]]

    def to_batch(self) -> Batch:
        """A torchrec ``Batch`` (labels 0) shaped like :class:`datasets.loader.BatchLoader`'s."""
        n = len(self.dense)
        values, lengths = [], []
        for ids in self.sparse.values():
            if isinstance(ids, list):
                values += ids
                lengths.append(np.array([len(v) for v in ids], dtype=np.int64))
            else:
                values.append(ids)
                lengths.append(np.ones(n, dtype=np.int64))
        kjt = KeyedJaggedTensor(
            keys=list(self.sparse),
            values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=n,
        )
        return Batch(
            dense_features=torch.from_numpy(self.dense), sparse_features=kjt, labels=torch.zeros(n)
        )


class RawEncoder:
    """Encodes raw records with a prepared dataset's transforms and vocabulary."""

    def __init__(self, meta: DatasetMeta, fmt: Format, vocabs: dict[str, FieldVocab]) -> None:
        if fmt.sparse != meta.sparse_names or fmt.dense != meta.dense:
            raise PreparedDataError(
                f"{meta.root}: meta.json fields {meta.dense + meta.sparse_names} do not match "
                f"the {fmt.name} format's {fmt.dense + fmt.sparse}"
            )
        self.meta = meta
        self.format = fmt
        self.vocabs = vocabs
        self.fields = fmt.feature_columns
        self._accepted = {*fmt.columns}

    @classmethod
    def load(cls, root: str | os.PathLike) -> RawEncoder:
        meta = DatasetMeta.load(root)
        return cls(meta, format_for_meta(meta), load_field_vocabs(meta))

    def encode(self, records: Sequence[Mapping[str, Any]]) -> EncodedRecords:
        """Encodes ``records`` (field -> raw value; multi-valued fields as lists or joined)."""
        if not records:
            raise ValueError("no records to encode")
        for i, record in enumerate(records):
            unknown = sorted(set(record) - self._accepted)
            if unknown:
                raise ValueError(f"record {i}: unknown fields {unknown}; expected {self.fields}")
        table = pa.table(
            {
                c: _raw_column(c, [r.get(c) for r in records], self.format.multi_valued.get(c))
                for c in self.fields
            }
        )
        issues = Issues(len(records))
        features = self.format.transform(table, issues, labeled=False)
        for flag in issues.first_reasons():
            i = int(np.argmax(flag.mask))
            raise ValueError(
                f"record {i}: {flag.reason} in field {flag.field!r} "
                f"(value {flag.values[i].as_py()!r})"
            )
        dense = (
            np.stack([features.dense[d] for d in self.meta.dense], axis=1)
            if self.meta.dense
            else np.zeros((len(records), 0), dtype=np.float32)
        )
        sparse: dict[str, np.ndarray | list[np.ndarray]] = {}
        for f in self.meta.sparse:
            ids = self.vocabs[f.name].lookup(features.tokens[f.name])
            if f.multi_hot:
                offsets = ids.offsets.to_numpy()
                flat = ids.flatten().to_numpy().astype(np.int64)
                sparse[f.name] = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
            else:
                sparse[f.name] = ids.to_numpy().astype(np.int64)
        return EncodedRecords(dense.astype(np.float32), sparse)


def format_for_meta(meta: DatasetMeta) -> Format:
    """The format (with its options) that produced a prepared dataset."""
    if meta.options.get("generator") == "synthetic":
        # Synthetic raw values are decimal Zipf ranks and its dense values are already final.
        single = [f.name for f in meta.sparse if not f.multi_hot]
        multi = {f.name: "|" for f in meta.sparse if f.multi_hot}
        return TableFormat(
            TableSchema(
                label=meta.label,
                categorical=tuple(single),
                numeric=tuple(meta.dense),
                multi_valued=multi,
                numeric_transform="identity",
            )
        )
    name = meta.options.get("format")
    if name not in FORMATS:
        raise PreparedDataError(
            f"{meta.root}: meta.json names no known format ({name!r}); known: {sorted(FORMATS)}"
        )
    return FORMATS[name].from_config(meta.options.get("config", {}))


def load_field_vocabs(meta: DatasetMeta) -> dict[str, FieldVocab]:
    """Each field's :class:`FieldVocab` from ``vocab.parquet``, checked against meta.json."""
    assert meta.root is not None, "meta was not loaded from a directory"
    path = Path(meta.root) / VOCAB_FILE
    if not path.exists():
        raise PreparedDataError(f"{path}: missing vocabulary file")
    table = pq.read_table(path)
    out = {}
    for f in meta.sparse:
        rows = table.filter(pc.equal(table["field"], f.name))
        rows = rows.take(pc.sort_indices(rows["id"]))
        ids = rows["id"].to_numpy()
        if len(ids) != f.cardinality - 1 or not np.array_equal(ids, np.arange(1, f.cardinality)):
            raise PreparedDataError(
                f"{path}: ids of field {f.name!r} are not 1..{f.cardinality - 1}"
            )
        out[f.name] = FieldVocab(rows["value"].combine_chunks())
    return out


def _raw_column(name: str, values: list[Any], separator: str | None) -> pa.Array:
    """One raw column of the records; a multi-valued field may mix lists and joined strings."""
    lists = [v for v in values if isinstance(v, list | tuple)]
    if not lists:
        return pa.array([_raw_string(v) for v in values], pa.string())
    if separator is None:
        raise ValueError(f"field {name!r} takes one value, got a list")
    return pa.array(
        [
            None
            if v is None
            else [_raw_string(x) for x in (v.split(separator) if isinstance(v, str) else v)]
            for v in values
        ],
        pa.list_(pa.string()),
    )


def _raw_string(value: Any) -> str | None:
    """A raw value as the token a text file would hold (3.0 -> "3", True -> "1"; "" is
    missing, as an empty field is in a file)."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        return str(int(value)) if value.is_integer() else repr(value)
    raise ValueError(f"raw values must be strings, numbers or lists, got {type(value).__name__}")
