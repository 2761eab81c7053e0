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

import hashlib
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from datasets.fingerprint import MISSING, fingerprint_strings
from datasets.prepare.base import Format
from datasets.prepare.columns import Features, Issues
from datasets.prepare.vocab import FieldVocab
from datasets.prepared import VOCAB_FILE, DatasetMeta, PreparedDataError
from datasets.readers.registry import READERS
from datasets.readers.table import TableFormat, TableSchema


@dataclass
class EncodedRecords:
    """Encoded records: dense ``[n, len(meta.dense)]`` and, per sparse field, int64 ids
    ``[n]`` (single-hot) or a list of n id arrays (multi-hot)."""

    dense: np.ndarray
    sparse: dict[str, np.ndarray | list[np.ndarray]]
    #: bag sizes of the multi-hot fields (filled by the encoder; derived when absent)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)

    def to_batch(self) -> Batch:
        """A torchrec ``Batch`` (labels 0) shaped like :class:`datasets.loader.BatchLoader`'s."""
        n = len(self.dense)
        values, lengths = [], []
        ones = np.ones(n, dtype=np.int64)  # every single-hot field's lengths (read-only use)
        for name, ids in self.sparse.items():
            if isinstance(ids, list):
                values += ids
                lengths.append(
                    self.lengths[name]
                    if name in self.lengths
                    else np.array([len(v) for v in ids], dtype=np.int64)
                )
            else:
                values.append(ids)
                lengths.append(ones)
        kjt = KeyedJaggedTensor(
            keys=list(self.sparse),
            values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=n,
        )
        return Batch(
            dense_features=torch.from_numpy(self.dense), sparse_features=kjt, labels=torch.zeros(n)
        )


class RawEncoder:
    """Encodes raw records with a prepared dataset's transforms and vocabulary.

    A batch of up to :attr:`MEMO_ROWS` rows is answered from a memo of each raw column's
    recently seen values (value -> the features computed from it), when the format declares
    that every feature comes from one raw column (:attr:`Format.sources`): the vectorised
    transform's fixed cost per column (a few ms over all columns) is paid only for values
    not seen before, all of them in one vectorised call. The memo holds what that call
    produced, so answers are identical either way; a batch whose new values fail to encode
    is encoded again whole by the vectorised path, for its own error message.
    """

    #: batches of at most this many rows always use the memo; larger ones while recent batches
    #: found most of their values in it (with mostly new values, per-value lookups cost more
    #: than they save on a large batch), and one in 8 to measure that again
    MEMO_ROWS = 256
    #: batches of at most this many rows look their tokens up in one combined index (faster
    #: for few rows: ~1.3x at 1 to 256 rows, ~0.5x at 4096, measured side by side)
    COMBINED_ROWS = 1024
    #: values memoised over all raw columns (shared out evenly: at most ~250 bytes a value,
    #: so ~30 MB); a column whose share is full starts over
    MEMO_VALUES = 1 << 17

    def __init__(
        self,
        meta: DatasetMeta,
        fmt: Format,
        vocabs: dict[str, FieldVocab],
        fingerprint_fields: Sequence[str] = (),
    ) -> None:
        if fmt.sparse != meta.sparse_names or fmt.dense != meta.dense:
            raise PreparedDataError(
                f"{meta.root}: meta.json fields {meta.dense + meta.sparse_names} do not match "
                f"the {fmt.name} format's {fmt.dense + fmt.sparse}"
            )
        self.meta = meta
        self.format = fmt
        self.vocabs = vocabs
        # Fields encoded as raw-value fingerprints (no vocabulary), for fingerprint-keyed models.
        self.fingerprint_fields = set(fingerprint_fields)
        lacking = [
            f for f in meta.sparse_names if f not in vocabs and f not in self.fingerprint_fields
        ]
        if lacking:
            raise PreparedDataError(f"{meta.root}: no vocabulary for fields {lacking}")
        self.fields = fmt.feature_columns
        self._accepted = {*fmt.columns}
        self._numeric = set(meta.dense)
        self._index: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        self._plan = _memo_plan(fmt.sources, meta, self.fields)
        # (raw column, dense index) and (raw column, sparse field) of the bare columns
        self._bare: tuple[list[tuple[str, int]], list[tuple[str, str]]] = (
            [(c, p.dense[0][1]) for c, p in (self._plan or {}).items() if p.bare and p.dense],
            [(c, p.single[0][1]) for c, p in (self._plan or {}).items() if p.bare and p.single],
        )
        self._memo: dict[str, dict[Any, tuple]] = {c: {} for c in self.fields}
        self._combined: tuple[np.ndarray, np.ndarray, dict[str, np.uint64]] | None = None
        self._new_share = 0.0  # recent batches' share of values not in the memo (moving mean)
        self._large = 0  # large batches seen

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
        return self.encode_columns(
            {c: [r.get(c) for r in records] for c in self.fields}, len(records)
        )

    def encode_columns(
        self, columns: Mapping[str, Sequence[Any]], rows: int | None = None
    ) -> EncodedRecords:
        """Encodes equal-length raw columns (field -> values); an absent field is missing in
        every row (``rows`` gives the count when no column does). Vectorised per column: no
        Python loop over rows for plain columns; a small batch is answered from the memo of
        recent values (see the class), with the same result."""
        unknown = sorted(set(columns) - self._accepted)
        if unknown:
            raise ValueError(f"unknown fields {unknown}; expected {self.fields}")
        sizes = {len(v) for v in columns.values()} | ({rows} if rows is not None else set())
        if len(sizes) != 1:
            raise ValueError(
                f"columns differ in length: { {k: len(v) for k, v in columns.items()} }"
                + (f", expected {rows}" if rows is not None else "")
            )
        (n,) = sizes
        if not n:
            raise ValueError("no records to encode")
        if self._plan is not None and (n <= self.MEMO_ROWS or self._memo_pays()):
            return self._encode_memoised(columns, n, self._plan)
        return self._encode_vectorised(columns, n)

    def _memo_pays(self) -> bool:
        self._large += 1
        return self._new_share < 0.25 or self._large % 8 == 0

    def _encode_memoised(
        self, columns: Mapping[str, Sequence[Any]], n: int, plan: dict[str, _ColumnPlan]
    ) -> EncodedRecords:
        """Per column, each value's features from the memo; the values not in it are
        encoded together in one vectorised call (as the rows of a small table, one column's
        new values under another's: a row's features depend on that row only).

        The per-value work runs in C (``map`` over the values and the memo's ``get``): a
        column of strings, or of floats, is its own keys (:func:`_memo_keys`), and a column
        with one dense or single-hot feature memoises the bare number (:class:`_ColumnPlan`)."""
        entries: dict[str, list[Any]] = {}
        new_values: dict[str, dict[Any, Any]] = {}  # column -> key -> raw value not memoised
        new_keys: dict[str, list[Any]] = {}  # column -> every row's key, for the new values
        for c in self.fields:
            values = columns.get(c)
            memo = self._memo[c]
            if values is None:
                got = memo.get(_NONE_KEY)
                if got is None:
                    new_values[c] = {_NONE_KEY: None}
                entries[c] = [got] * n
                continue
            keys = _memo_keys(values)
            if keys is None:  # a value the memo cannot key (NaN, an odd type): no memo
                return self._encode_vectorised(columns, n)
            got_list = list(map(memo.get, keys))
            if None in got_list:
                new_values[c] = {
                    k: v for k, v, e in zip(keys, values, got_list, strict=True) if e is None
                }
                new_keys[c] = keys
            entries[c] = got_list
        fresh_share = sum(map(len, new_values.values())) / (n * max(len(self.fields), 1))
        self._new_share = 0.5 * self._new_share + 0.5 * fresh_share
        if new_values:
            rows = max(map(len, new_values.values()))
            table = {c: [*m.values(), *[None] * (rows - len(m))] for c, m in new_values.items()}
            try:
                fresh = self._encode_some(table, rows)
            except (ValueError, OverflowError, TypeError, pa.ArrowException):
                # The request's own rows, vectorised: the same error, naming its record.
                return self._encode_vectorised(columns, n)
            for c, m in new_values.items():
                made = dict(zip(m, plan[c].entries(fresh, len(m)), strict=True))
                memo = self._memo[c]
                if len(memo) + len(made) > self.MEMO_VALUES // len(self.fields):
                    memo.clear()
                memo.update(made)
                keys = new_keys.get(c)
                if keys is None:  # the column was absent: every row missing
                    entries[c] = [made[_NONE_KEY]] * n
                else:
                    entries[c] = [
                        e if e is not None else made[k]
                        for e, k in zip(entries[c], keys, strict=True)
                    ]
        dense = np.empty((n, len(self.meta.dense)), dtype=np.float32)
        sparse: dict[str, np.ndarray | list[np.ndarray]] = {}
        lengths: dict[str, np.ndarray] = {}
        # Columns whose entries are the feature's values themselves: one array call each
        # for all the dense features and all the single-hot ones.
        bare_dense, bare_single = self._bare
        if bare_dense:
            dense[:, [j for _, j in bare_dense]] = np.array(
                [entries[c] for c, _ in bare_dense], dtype=np.float32
            ).T
        if bare_single:
            block = np.array([entries[c] for c, _ in bare_single], dtype=np.int64)
            for (_, name), ids in zip(bare_single, block, strict=True):
                sparse[name] = ids
        for c, column in plan.items():
            if column.bare:
                continue
            got = entries[c]
            for pos, j in column.dense:
                dense[:, j] = list(map(itemgetter(pos), got))
            for pos, name in column.single:
                sparse[name] = np.array(list(map(itemgetter(pos), got)), dtype=np.int64)
            for pos, name in column.multi:
                bags = list(map(itemgetter(pos), got))
                sparse[name] = bags
                lengths[name] = np.fromiter(map(len, bags), np.int64, n)
        return EncodedRecords(dense, {f.name: sparse[f.name] for f in self.meta.sparse}, lengths)

    def _encode_vectorised(self, columns: Mapping[str, Sequence[Any]], n: int) -> EncodedRecords:
        table = pa.table(
            {
                c: _raw_column(c, columns[c], self.format.multi_valued.get(c), c in self._numeric)
                if c in columns
                else pa.nulls(n, pa.string())
                for c in self.fields
            }
        )
        issues = Issues(n)
        return self._encoded(self.format.transform(table, issues, labeled=False), issues, n)

    def _encode_some(self, columns: Mapping[str, Sequence[Any]], n: int) -> EncodedRecords:
        """The features of the given raw columns only (as :meth:`_encode_vectorised` computes
        them; the other features are left zero and absent), through the format's
        ``transform_columns`` where it offers it: the memo's new values pay for their own
        columns, not for every column of the format."""
        table = pa.table(
            {
                c: _raw_column(c, v, self.format.multi_valued.get(c), c in self._numeric)
                for c, v in columns.items()
            }
        )
        issues = Issues(n)
        features = self.format.transform_columns(table, issues)
        if features is None:
            return self._encode_vectorised(columns, n)
        return self._encoded(features, issues, n)

    def _encoded(self, features: Features, issues: Issues, n: int) -> EncodedRecords:
        """A transform's features -> ids and dense floats; the first flagged row refused.
        Features a partial transform left out are absent (sparse) or zero (dense)."""
        for flag in issues.first_reasons():
            i = int(np.argmax(flag.mask))
            raise ValueError(
                f"record {i}: {flag.reason} in field {flag.field!r} "
                f"(value {flag.values[i].as_py()!r})"
            )
        if not self.meta.dense:
            dense = np.zeros((n, 0), dtype=np.float32)
        elif len(features.dense) == len(self.meta.dense):
            dense = np.stack([features.dense[d] for d in self.meta.dense], axis=1)
        else:
            dense = np.zeros((n, len(self.meta.dense)), dtype=np.float32)
            for j, d in enumerate(self.meta.dense):
                if d in features.dense:
                    dense[:, j] = features.dense[d]
        sparse: dict[str, np.ndarray | list[np.ndarray]] = {}
        lengths: dict[str, np.ndarray] = {}
        flat_tokens: dict[str, pa.Array] = {}
        for f in self.meta.sparse:
            if f.name not in features.tokens:
                continue
            tokens = features.tokens[f.name]
            if isinstance(tokens, pa.ChunkedArray):
                tokens = tokens.combine_chunks()
            if f.multi_hot:
                offsets = tokens.offsets.to_numpy()
                lengths[f.name] = np.diff(offsets).astype(np.int64)
                tokens = tokens.flatten()
            flat_tokens[f.name] = tokens
        # One search over all fields saves a small batch the per-field fixed cost; a large
        # one searches each field's own (cache-sized) index faster.
        if n <= self.COMBINED_ROWS:
            ids = self._all_ids(flat_tokens)
        else:
            ids = {name: self._ids(name, t) for name, t in flat_tokens.items()}
        for f in self.meta.sparse:
            if f.name not in ids:
                continue
            if f.multi_hot:
                sparse[f.name] = np.split(ids[f.name], np.cumsum(lengths[f.name])[:-1])
            else:
                sparse[f.name] = ids[f.name]
        return EncodedRecords(dense.astype(np.float32), sparse, lengths)

    def _all_ids(self, tokens: dict[str, pa.Array]) -> dict[str, np.ndarray]:
        """:meth:`_ids` of every field at once: one fingerprint pass over all fields' tokens
        and one search of a combined index (each field's vocabulary fingerprints XORed with
        a constant of the field, sorted together), instead of a dozen numpy calls a field.
        Fields outside the combined index (a collision inside a field's vocabulary, or
        across fields after the XOR) take :meth:`_ids`."""
        combined = self._combined_index()
        names = [name for name in tokens if name in combined[2]]
        out = {name: self._ids(name, t) for name, t in tokens.items() if name not in combined[2]}
        if not names:
            return out
        parts = [tokens[name].cast(pa.large_string()) for name in names]
        sizes = np.array([len(t) for t in parts])
        fps = fingerprint_strings(pa.concat_arrays(parts))
        salts = np.repeat(np.array([combined[2][name] for name in names], np.uint64), sizes)
        keyed = fps.view(np.uint64) ^ salts
        sorted_keys, ids, _ = combined
        if len(sorted_keys):
            pos = np.minimum(np.searchsorted(sorted_keys, keyed), len(sorted_keys) - 1)
            found = (sorted_keys[pos] == keyed) & (fps != MISSING)
            found_ids = np.where(found, ids[pos], 0)
        else:
            found_ids = np.zeros(len(fps), np.int64)
        for name, part in zip(names, np.split(found_ids, np.cumsum(sizes)[:-1]), strict=True):
            out[name] = part
        return {name: out[name] for name in tokens}

    def _combined_index(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.uint64]]:
        """(sorted keys, their ids, field -> XOR constant) of every vocabulary field whose
        fingerprints are unique within the field and, XORed, across fields (built once)."""
        if self._combined is not None:
            return self._combined
        names = [f.name for f in self.meta.sparse if f.name not in self.fingerprint_fields]
        for name in names:
            self._ids(name, pa.array([], pa.string()))  # builds the field's index
        names = [name for name in names if self._index[name] is not None]
        salts = {
            name: np.uint64(
                int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
            )
            for name in names
        }
        keys = [self._index[name][0].view(np.uint64) ^ salts[name] for name in names]
        ids = [self._index[name][1] for name in names]
        all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        order = np.argsort(all_keys, kind="stable")
        sorted_keys = all_keys[order]
        if len(sorted_keys) > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
            self._combined = (np.zeros(0, np.uint64), np.zeros(0, np.int64), {})
        else:
            all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            self._combined = (sorted_keys, all_ids[order], salts)
        return self._combined

    def _ids(self, name: str, tokens: pa.Array) -> np.ndarray:
        """int64 ids of string tokens: binary search of their fingerprints in the field's
        sorted vocabulary fingerprints (built once), unknown tokens -> 0; for a fingerprint
        field, the fingerprints themselves."""
        if name in self.fingerprint_fields:
            return fingerprint_strings(tokens)
        if name not in self._index:
            fps = fingerprint_strings(self.vocabs[name].values)
            order = np.argsort(fps, kind="stable")
            sorted_fps = fps[order]
            if len(sorted_fps) > 1 and bool((sorted_fps[1:] == sorted_fps[:-1]).any()):
                self._index[name] = None  # a 64-bit collision: exact lookup instead
            else:
                self._index[name] = (sorted_fps, order.astype(np.int64) + 1)
        index = self._index[name]
        if index is None:
            return self.vocabs[name].lookup(tokens).to_numpy().astype(np.int64)
        sorted_fps, ids = index
        fps = fingerprint_strings(tokens)
        if not len(sorted_fps):
            return np.zeros(len(fps), dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_fps, fps), len(sorted_fps) - 1)
        found = (sorted_fps[pos] == fps) & (fps != MISSING)
        return np.where(found, ids[pos], 0)


@dataclass
class _ColumnPlan:
    """Where one raw column's features go: ``(position in its memo entry, dense index)`` and
    ``(position, sparse field)`` for single- and multi-hot fields. A column with exactly one
    dense or single-hot feature (:attr:`bare`) memoises that number itself, not a 1-tuple."""

    dense: list[tuple[int, int]] = field(default_factory=list)
    single: list[tuple[int, str]] = field(default_factory=list)
    multi: list[tuple[int, str]] = field(default_factory=list)
    size: int = 0
    bare: bool = False  # set by _memo_plan once every feature is placed

    def entries(self, encoded: EncodedRecords, rows: int) -> list[Any]:
        """The features from this column of the first ``rows`` rows, as the memo holds them
        (Python floats and ints: a float32 goes back to float32 exactly)."""
        parts: list[Any] = [None] * self.size
        for pos, j in self.dense:
            parts[pos] = encoded.dense[:rows, j].tolist()
        for pos, name in self.single:
            parts[pos] = encoded.sparse[name][:rows].tolist()  # type: ignore[call-overload]
        for pos, name in self.multi:
            parts[pos] = encoded.sparse[name][:rows]
        return parts[0] if self.bare else list(zip(*parts, strict=True))


def _memo_plan(
    sources: dict[str, str] | None, meta: DatasetMeta, fields: Sequence[str]
) -> dict[str, _ColumnPlan] | None:
    """Each raw column's features, when every feature has its one declared raw column."""
    if sources is None:
        return None
    plan = {c: _ColumnPlan() for c in fields}
    outputs = [(d, j, None) for j, d in enumerate(meta.dense)]
    outputs += [(f.name, None, f.multi_hot) for f in meta.sparse]
    for name, j, multi_hot in outputs:
        column = plan.get(sources.get(name, ""))
        if column is None:
            return None
        target = column.dense if j is not None else column.multi if multi_hot else column.single
        target.append((column.size, j if j is not None else name))  # type: ignore[arg-type]
        column.size += 1
    for column in plan.values():
        column.bare = column.size == 1 and not column.multi
    return plan


#: the memo key of a missing value (an absent field or null)
_NONE_KEY = (type(None), None)


def _memo_keys(values: Sequence[Any]) -> Sequence[Any] | None:
    """:func:`_memo_key` of every value, or ``None`` when one cannot be keyed. A column of
    strings is its own keys, and so is one of floats without NaN or zeros (the checks run
    in C, value by value)."""
    kinds = set(map(type, values))
    if kinds == {str} or (
        kinds == {float} and 0.0 not in values and not any(map(math.isnan, values))
    ):
        return values
    keys = list(map(_memo_key, values))
    return None if None in keys else keys


def _memo_key(value: Any) -> Any:
    """A hashable key that tells apart every raw value that may encode differently (type
    included: 1, 1.0, True and "1" are four keys); ``None`` when the value cannot be keyed."""
    kind = type(value)
    if kind is str:
        return value
    if kind is float or isinstance(value, float | np.floating):
        if value != value:  # NaN never equals itself: no memo
            return None
        if value == 0:  # 0.0 == -0.0, but their text (and a transform's output) may differ
            return (kind, value, repr(value))
        # A float is its own key: no other key equals it (strings never do, other numbers
        # and subclasses of float are keyed with their type).
        return value if kind is float else (kind, value)
    if kind is list or kind is tuple:
        items = tuple(map(_memo_key, value))
        return None if None in items else (kind, items)
    try:
        hash(value)
    except TypeError:
        return None
    return (kind, value)


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
    if name not in READERS:
        raise PreparedDataError(
            f"{meta.root}: meta.json names no known format ({name!r}); known: {sorted(READERS)}"
        )
    return READERS[name].format.from_config(meta.options.get("config", {}))


def load_field_vocabs(
    meta: DatasetMeta, fields: Sequence[str] | None = None
) -> dict[str, FieldVocab]:
    """Each field's (or ``fields``') :class:`FieldVocab` from ``vocab.parquet``, checked
    against meta.json."""
    assert meta.root is not None, "meta was not loaded from a directory"
    if fields is not None and not fields:
        return {}
    path = Path(meta.root) / VOCAB_FILE
    if not path.exists():
        raise PreparedDataError(f"{path}: missing vocabulary file")
    table = pq.read_table(path)
    out = {}
    for f in meta.sparse:
        if fields is not None and f.name not in fields:
            continue
        rows = table.filter(pc.equal(table["field"], f.name))
        rows = rows.take(pc.sort_indices(rows["id"]))
        ids = rows["id"].to_numpy()
        if len(ids) != f.cardinality - 1 or not np.array_equal(ids, np.arange(1, f.cardinality)):
            raise PreparedDataError(
                f"{path}: ids of field {f.name!r} are not 1..{f.cardinality - 1}"
            )
        out[f.name] = FieldVocab(rows["value"].combine_chunks())
    return out


def _raw_column(
    name: str, values: Sequence[Any], separator: str | None, numeric: bool = False
) -> pa.Array:
    """One raw column as strings, as a text file would hold them (vectorised by value type:
    strings, integers and booleans convert in Arrow, and numbers of a numeric field; other
    mixes value by value)."""
    kinds = set(map(type, values))
    odd = [k for k in kinds - _RAW_TYPES if not issubclass(k, numbers.Real | np.bool_)]
    if odd:
        raise ValueError(
            f"field {name!r}: raw values must be strings, numbers, booleans, null or lists, "
            f"got {odd[0].__name__}"
        )
    if kinds <= {str, type(None)}:
        column = pa.array(values, pa.string())
        # "" is a missing value, as an empty field is in a file.
        return pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
    if kinds <= {int, type(None)}:
        try:
            return pa.array(values, pa.int64()).cast(pa.string())
        except OverflowError:  # beyond 64 bits: still a token, as text
            return pa.array([None if v is None else str(v) for v in values], pa.string())
    if kinds <= {bool, type(None)}:
        return pa.array(values, pa.bool_()).cast(pa.int8()).cast(pa.string())
    if numeric and kinds <= {int, float, type(None)}:
        # The numeric transform parses the text, so Arrow's shortest float text is exact.
        return pa.array(values, pa.float64()).cast(pa.string())
    lists = [v for v in values if isinstance(v, list | tuple)]
    if not lists:
        return pa.array([_raw_string(v, numeric) for v in values], pa.string())
    if separator is None:
        raise ValueError(f"field {name!r} takes one value, got a list")
    if any(not isinstance(x, str | numbers.Real) for v in lists for x in v):
        raise ValueError(f"field {name!r}: list items must be strings or numbers")
    return pa.array(
        [
            None
            if v is None
            else [_raw_string(x) for x in (v.split(separator) if isinstance(v, str) else v)]
            for v in values
        ],
        pa.list_(pa.string()),
    )


_RAW_TYPES = {str, int, float, bool, type(None), list, tuple}


def _raw_string(value: Any, numeric: bool = False) -> str | None:
    """A raw value as the token a text file would hold (3.0 -> "3", True -> "1"; "" is
    missing, as an empty field is in a file). In a ``numeric`` field -0.0 keeps its sign
    ("-0"), as the field's all-numbers path (Arrow's text) does: a value encodes alike
    whatever other types its column holds."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if numeric and value == 0 and math.copysign(1.0, value) < 0:
            return "-0"
        return str(int(value)) if value.is_integer() else repr(value)
    raise ValueError(f"raw values must be strings, numbers or lists, got {type(value).__name__}")
