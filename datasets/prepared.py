"""The prepared-data format: parquet shards per split plus ``meta.json``.

Layout of a prepared directory::

    meta.json                  schema, cardinalities, rows per split, options, bad-row report
    frequencies.safetensors    per sparse field, int64 train-split counts indexed by id (id 0 = OOV)
    vocab.parquet              raw value -> id per sparse field (columns field, value, id; id >= 1)
    train/part-00000.parquet   columns: label, dense..., sparse...  (sparse ids are int32;
    valid/part-00000.parquet            multi-hot fields are list<int32>)
    test/part-00000.parquet

Ids of every sparse field are assigned in descending train frequency, so id 1 is the most
frequent value and id 0 is the OOV bucket (rare, unseen or missing values).

Example::

    meta = DatasetMeta.load("data/synth")
    meta.sparse[0].name, meta.sparse[0].cardinality, meta.rows("train")
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from datasets.io import atomic_path, atomic_write, atomic_write_text, file_sha256, only_names

FORMAT_NAME = "ctr-compress/prepared"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
FREQUENCIES_FILE = "frequencies.safetensors"
VOCAB_FILE = "vocab.parquet"


class PreparedDataError(ValueError):
    """A prepared directory is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class SparseField:
    """One categorical field after encoding: ids live in ``[0, cardinality)``, 0 = OOV."""

    name: str
    cardinality: int
    multi_hot: bool = False


@dataclass
class SplitInfo:
    rows: int = 0
    files: list[str] = field(default_factory=list)


@dataclass
class DatasetMeta:
    """Everything ``meta.json`` records about a prepared dataset."""

    name: str
    label: str
    dense: list[str]
    sparse: list[SparseField]
    splits: dict[str, SplitInfo]
    options: dict[str, Any] = field(default_factory=dict)
    bad_rows: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None

    def rows(self, split: str) -> int:
        return self.split(split).rows

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise PreparedDataError(
                f"{self.root or self.name}: no split {split!r}; available: {sorted(self.splits)}"
            )
        return self.splits[split]

    def files(self, split: str) -> list[Path]:
        assert self.root is not None, "meta was not loaded from a directory"
        return [self.root / f for f in self.split(split).files]

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    def frequencies(self) -> dict[str, np.ndarray]:
        """Per-field train counts indexed by id (index 0 counts OOV occurrences).

        The arrays map the file (copy-on-write: writes stay in memory, never reach it), so a
        method that never reads them costs no memory for them: at millions of ids they are
        8 bytes per id, which every method is handed and few use. The counts are checked
        whole here, read in chunks, so the check does not make them resident either."""
        assert self.root is not None, "meta was not loaded from a directory"
        path = self.root / FREQUENCIES_FILE
        if not path.exists():
            raise PreparedDataError(f"{path}: missing frequency file")
        try:
            with safe_open(str(path), framework="np") as f:  # checks the header and offsets
                names = set(f.keys())
            header, start = _safetensors_header(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise PreparedDataError(f"{path}: unreadable frequency file ({e})") from e
        out = {}
        for f in self.sparse:
            if f.name not in names:
                raise PreparedDataError(f"{path}: no frequencies for field {f.name!r}")
            entry = header[f.name]
            shape, dtype = tuple(entry["shape"]), entry["dtype"]
            if shape != (f.cardinality,):
                raise PreparedDataError(
                    f"{path}: field {f.name!r} has {shape[0] if shape else 0} counts, "
                    f"cardinality is {f.cardinality}"
                )
            offset = start + entry["data_offsets"][0]
            low = _chunked_min(path, offset, f.cardinality) if dtype == "I64" else 0
            if dtype != "I64" or low < 0:
                raise PreparedDataError(
                    f"{path}: field {f.name!r} counts must be non-negative int64, "
                    f"got {_SAFETENSORS_DTYPES.get(dtype, dtype)} (min {low})"
                )
            out[f.name] = (
                np.memmap(path, dtype="<i8", mode="c", offset=offset, shape=shape).view(np.ndarray)
                if f.cardinality
                else np.zeros(0, dtype=np.int64)
            )
        return out

    def vocabulary(self) -> dict[str, Any]:
        """The identity of the ids: ``vocab.parquet``'s sha256 (None if absent) and the
        cardinalities. Two datasets whose identities differ give the same id other meanings."""
        assert self.root is not None, "meta was not loaded from a directory"
        path = self.root / VOCAB_FILE
        return {
            "sha256": file_sha256(path) if path.exists() else None,
            "cardinalities": {f.name: f.cardinality for f in self.sparse},
        }

    def verify_vocabulary(self) -> None:
        """Checks that ``vocab.parquet`` (if any) reads and maps exactly ids 1..cardinality-1
        of every field; one vectorised pass."""
        assert self.root is not None, "meta was not loaded from a directory"
        path = self.root / VOCAB_FILE
        if not path.exists():
            return
        try:
            table = pq.read_table(path, columns=["field", "value", "id"])
        except (OSError, pa.ArrowException) as e:
            raise PreparedDataError(f"{path}: unreadable vocabulary ({e})") from e
        fields = table["field"].combine_chunks().dictionary_encode()
        names = fields.dictionary.to_pylist()
        codes = fields.indices.to_numpy(zero_copy_only=False)
        ids = table["id"].to_numpy().astype(np.int64)
        for f in self.sparse:
            code = names.index(f.name) if f.name in names else -1
            mine = ids[codes == code]
            ok = len(mine) == f.cardinality - 1 and (
                len(mine) == 0
                or (
                    mine.min() >= 1
                    and mine.max() < f.cardinality
                    and np.bincount(mine, minlength=f.cardinality)[1:].min() == 1
                )
            )
            if not ok:
                raise PreparedDataError(
                    f"{path}: field {f.name!r} must map {f.cardinality - 1} values to ids "
                    f"1..{f.cardinality - 1} (meta.json's cardinality), holds {len(mine)} rows"
                )

    def check_vocabulary(self, expected: dict[str, Any] | None, what: str) -> None:
        """Refuses this dataset unless its vocabulary is ``expected`` (that of ``what``)."""
        if not expected:
            return  # recorded before vocabularies were
        actual = self.vocabulary()
        if expected.get("cardinalities") != actual["cardinalities"]:
            diff = [
                f"{k}: {v} vs {actual['cardinalities'].get(k)}"
                for k, v in expected.get("cardinalities", {}).items()
                if actual["cardinalities"].get(k) != v
            ] or [f"fields {sorted(actual['cardinalities'])}"]
            raise PreparedDataError(
                f"{self.root} does not match {what}: cardinalities differ ({', '.join(diff[:3])}); "
                "its ids mean other values — use the dataset it was trained on"
            )
        if expected.get("sha256") and actual["sha256"] and expected["sha256"] != actual["sha256"]:
            raise PreparedDataError(
                f"{self.root} does not match {what}: {VOCAB_FILE} sha256 "
                f"{actual['sha256'][:12]}… vs {expected['sha256'][:12]}… (re-prepared?); "
                "its ids mean other values — use the dataset it was trained on"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "label": self.label,
            "dense": list(self.dense),
            "sparse": [asdict(f) for f in self.sparse],
            "frequencies": FREQUENCIES_FILE,
            "splits": {k: asdict(v) for k, v in self.splits.items()},
            "options": self.options,
            "bad_rows": self.bad_rows,
            **self.extra,
        }

    def save(self, root: str | os.PathLike) -> None:
        atomic_write_text(Path(root) / "meta.json", json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, root: str | os.PathLike) -> DatasetMeta:
        root = Path(root)
        path = root / "meta.json"
        if not path.exists():
            raise PreparedDataError(
                f"{root}: not a prepared dataset (no meta.json); "
                "create one with `ctr synth` or `ctr prepare`"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PreparedDataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        if raw.get("format") != FORMAT_NAME:
            raise PreparedDataError(f"{path}: format is {raw.get('format')!r}, not {FORMAT_NAME}")
        if raw.get("version") != FORMAT_VERSION:
            raise PreparedDataError(f"{path}: unsupported version {raw.get('version')!r}")
        known = {
            "format",
            "version",
            "name",
            "label",
            "dense",
            "sparse",
            "frequencies",
            "splits",
            "options",
            "bad_rows",
        }
        try:
            meta = cls(
                name=raw["name"],
                label=raw["label"],
                dense=list(raw["dense"]),
                sparse=[SparseField(**f) for f in raw["sparse"]],
                splits={k: SplitInfo(**v) for k, v in raw["splits"].items()},
                options=raw.get("options", {}),
                bad_rows=raw.get("bad_rows", {}),
                extra={k: v for k, v in raw.items() if k not in known},
                root=root,
            )
        except (KeyError, TypeError) as e:
            raise PreparedDataError(f"{path}: malformed meta.json ({e})") from e
        for f in meta.sparse:
            if not isinstance(f.cardinality, int) or f.cardinality < 1:
                raise PreparedDataError(f"{path}: field {f.name!r} has cardinality {f.cardinality}")
        for split, info in meta.splits.items():
            for name in info.files:
                # Shards live inside the dataset: a path leaving it is refused, not read.
                if (
                    not isinstance(name, str)
                    or Path(name).is_absolute()
                    or ".." in Path(name).parts
                ):
                    raise PreparedDataError(
                        f"{path}: split {split!r} lists {name!r}; shard paths must be relative "
                        "and stay inside the dataset directory"
                    )
        return meta

    def check_shards(self, splits: Iterable[str] = SPLITS) -> None:
        """Every shard of ``splits`` exists: a missing one is found before training, not after."""
        for split in splits:
            missing = [p for p in self.files(split) if not p.is_file()]
            if missing:
                raise PreparedDataError(
                    f"{missing[0]}: missing shard of split {split!r} "
                    f"({len(missing)} of {len(self.files(split))} missing); re-prepare the dataset"
                )


def arrow_schema(label: str, dense: list[str], sparse: list[SparseField]) -> pa.Schema:
    fields = [pa.field(label, pa.float32())]
    fields += [pa.field(d, pa.float32()) for d in dense]
    fields += [
        pa.field(f.name, pa.list_(pa.int32()) if f.multi_hot else pa.int32()) for f in sparse
    ]
    return pa.schema(fields)


class ShardWriter:
    """Writes one split as numbered parquet shards, each made visible atomically.

    Rows arrive in chunks (``write(table)``) and stream to the open shard as row groups; a
    shard is renamed into place once it holds ``rows_per_shard`` rows (or at ``close``), so
    memory stays bounded by one chunk whatever the split's size.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, schema: pa.Schema, rows_per_shard: int = 1 << 20
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.info = SplitInfo()
        self._writer: pq.ParquetWriter | None = None
        self._shard = ExitStack()  # the open shard's rename into place
        self._shard_rows = 0
        (self.root / split).mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        while table.num_rows:
            if self._writer is None:
                self._open()
            take = min(table.num_rows, self.rows_per_shard - self._shard_rows)
            self._writer.write_table(table.slice(0, take), row_group_size=1 << 16)
            self._shard_rows += take
            table = table.slice(take)
            if self._shard_rows == self.rows_per_shard:
                self._finish()

    def close(self) -> SplitInfo:
        if self._writer is None and not self.info.files:
            self._open()  # an empty split still gets one (empty) shard
        if self._writer is not None:
            self._finish()
        return self.info

    def _path(self) -> Path:
        return self.root / f"{self.split}/part-{len(self.info.files):05d}.parquet"

    def _open(self) -> None:
        tmp = self._shard.enter_context(atomic_path(self._path()))
        self._writer = pq.ParquetWriter(tmp, self.schema)
        self._shard_rows = 0

    def _finish(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._shard.close()  # renames the shard into place
        self.info.files.append(str(self._path().relative_to(self.root)))
        self.info.rows += self._shard_rows
        self._writer = None


_SAFETENSORS_DTYPES = {"I64": "int64", "I32": "int32", "F32": "float32", "F64": "float64"}


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data
    starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return header, 8 + size


def _chunked_min(path: Path, offset: int, count: int, chunk: int = 1 << 20) -> int:
    """The smallest of ``count`` int64 at ``offset`` of ``path``, read ``chunk`` at a time
    (not mapped: the pages never join this process's memory)."""
    low = 0
    with open(path, "rb") as f:
        f.seek(offset)
        for first in range(0, count, chunk):
            part = np.fromfile(f, dtype="<i8", count=min(chunk, count - first))
            low = min(low, int(part.min()))
    return low


def save_frequencies(root: str | os.PathLike, counts: Mapping[str, np.ndarray]) -> None:
    tensors = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in counts.items()}
    atomic_write(Path(root) / FREQUENCIES_FILE, lambda tmp: save_file(tensors, str(tmp)))


def frequency_order(counts: np.ndarray, min_count: int = 1) -> tuple[np.ndarray, int]:
    """Maps raw value indices to ids in descending-frequency order.

    ``counts[i]`` is the train count of raw value ``i``. Returns ``(remap, cardinality)`` where
    ``remap[i]`` is the id of raw value ``i`` (0 when its count is below ``min_count``) and
    ``cardinality`` counts the OOV id. Ties keep raw order, so the mapping is deterministic.
    """
    order = np.argsort(-counts, kind="stable")
    kept = int((counts >= max(min_count, 1)).sum())
    remap = np.zeros(len(counts), dtype=np.int64)
    remap[order[:kept]] = np.arange(1, kept + 1)
    return remap, kept + 1


def encoded_counts(remap: np.ndarray, counts: np.ndarray, cardinality: int) -> np.ndarray:
    """Train counts indexed by encoded id (index 0 sums all values folded into OOV)."""
    return np.bincount(remap, weights=counts, minlength=cardinality).astype(np.int64)


def save_vocab(root: str | os.PathLike, vocab: Mapping[str, tuple[pa.Array, np.ndarray]]) -> None:
    """Writes ``{field: (raw values as strings, their ids)}``; values absent from it are OOV."""
    parts = []
    for name, (values, ids) in vocab.items():
        values = pa.array(values, pa.string()) if not isinstance(values, pa.Array) else values
        parts.append(
            pa.table(
                {
                    "field": pa.array([name] * len(values), pa.string()),
                    "value": values.cast(pa.string()),
                    "id": pa.array(np.asarray(ids, dtype=np.int32)),
                }
            )
        )
    schema = pa.schema([("field", pa.string()), ("value", pa.string()), ("id", pa.int32())])
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    atomic_write(Path(root) / VOCAB_FILE, lambda tmp: pq.write_table(table, tmp))


def load_vocab(root: str | os.PathLike) -> dict[str, dict[str, int]]:
    """``{field: {raw value: id}}`` as written by :func:`save_vocab`."""
    path = Path(root) / VOCAB_FILE
    if not path.exists():
        raise PreparedDataError(f"{path}: missing vocabulary file")
    table = pq.read_table(path)
    out: dict[str, dict[str, int]] = {}
    for name, value, id_ in zip(
        table["field"].to_pylist(), table["value"].to_pylist(), table["id"].to_pylist(), strict=True
    ):
        out.setdefault(name, {})[value] = id_
    return out


def is_prepared_dataset(path: Path) -> bool:
    """Whether directory ``path`` holds a prepared dataset and nothing else (so replacing it
    loses nothing the user put there)."""
    try:
        fmt = json.loads((path / "meta.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return False
    if fmt != FORMAT_NAME or not only_names(
        path, {"meta.json", FREQUENCIES_FILE, VOCAB_FILE, *SPLITS}
    ):
        return False
    # A split folder holds only our shards: a user's train/ of images is not ours to delete.
    for split in SPLITS:
        folder = path / split
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            return False
        if folder.is_dir() and not all(
            p.is_file() and not p.is_symlink() and SHARD_NAME.fullmatch(p.name)
            for p in folder.iterdir()
        ):
            return False
    return True


SHARD_NAME = re.compile(r"part-\d{5,}\.parquet")


def iter_tables(paths: Iterable[Path], columns: list[str] | None = None) -> Iterable[pa.Table]:
    for p in paths:
        try:
            yield pq.read_table(p, columns=columns)
        except (OSError, pa.ArrowInvalid) as e:
            raise PreparedDataError(f"{p}: cannot read parquet shard ({e})") from e
