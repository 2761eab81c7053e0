"""The preprocessing engine every format shares: two streaming passes, splits, bad rows.

A format declares its columns and a vectorised ``transform`` (raw string columns ->
label, dense floats, categorical tokens); a reader yields chunks of raw columns with line
numbers. :func:`prepare_dataset` then

1. counts the tokens of every sparse field over the *train* rows (memory ~ distinct values),
   and shows the format those rows for the fields it fits itself (``fitted_fields``: the
   quantile buckets of ``prepare table``, sketched in fixed memory),
2. assigns ids by descending train frequency (0 = OOV: rarer than ``min_count``, unseen in
   train, or missing), takes the fitted fields' tokens from ``Format.fit`` and saves the
   vocabulary,
3. reads everything again, encodes each chunk and appends it to its split's shards, counting
   the fitted fields' train ids, then saves the frequencies (exact train counts by id),
4. writes ``meta.json`` last, so an interrupted run never looks complete.

All of it is written into a staging directory beside ``out`` and renamed into place when
complete (``datasets.io.replace_dir``): ``out`` must be absent, empty or a prepared
dataset (replaced only with ``overwrite``), and a failed run leaves it as it was.

Which split a row belongs to is a pure function of (source file, row position), known in
pass 1 without reading ahead. Malformed rows are counted per reason with their first
``file:line`` examples, or stop the run (``on_bad_row="fail"``); more than
``max_dropped_fraction`` of them fails the run before ``meta.json`` is written.

Example::

    fmt = CriteoFormat(CriteoConfig())
    reader = FileReader([TextSource("train.txt", fmt.columns, "\\t")])
    meta = prepare_dataset(fmt, reader, "data/criteo", random_split(seed=0),
                           PrepareOptions(min_count=10))
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets.io import OutputExistsError, check_output_dir, replace_dir
from datasets.prepare.columns import Features, Flag, Issues, as_array
from datasets.prepare.sources import (
    BadInputError,
    ParquetSource,
    RawChunk,
    Rejection,
    TextSource,
    prefetch,
)
from datasets.prepared import (
    SPLITS,
    DatasetMeta,
    ShardWriter,
    SparseField,
    SplitInfo,
    arrow_schema,
    encoded_counts,
    frequency_order,
    is_prepared_dataset,
    save_frequencies,
    save_vocab,
)
from datasets.progress import progress_bar
from datasets.synthetic import splitmix64

LABEL = "label"  # the label column of every prepared dataset, whatever the raw name
BAD_ROW_POLICIES = ("skip", "fail")
END_OF_SOURCE = 1 << 62  # the stop of a split range that takes a whole file
MAX_BLOCK_BYTES = 256 << 20  # the largest chunk the vocabulary size may ask for


@dataclass(frozen=True)
class PrepareOptions:
    """Options every format shares.

    ``min_count``/``split`` left as ``None`` take the format's default (Criteo: 10 and the
    7-day protocol; see each ``prepare_*`` function). ``fractions`` are train/valid/test
    shares for the ``random`` and ``ordered`` splits. ``block_bytes`` of raw text are read
    and encoded at a time (more when the vocabulary is large, see :func:`encode_block_bytes`);
    peak memory is a few such blocks, one shard per split, plus the vocabulary.
    ``max_dropped_fraction``: a run whose bad rows exceed this share of the lines read fails
    instead of writing ``meta.json`` (a broken join or a wrong schema drops most rows; that
    must not pass for a dataset).
    """

    min_count: int | None = None
    split: str | None = None
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    on_bad_row: str = "skip"
    overwrite: bool = False
    progress: bool = True
    block_bytes: int = 8 << 20
    rows_per_shard: int = 1 << 20
    max_examples: int = 5
    max_dropped_fraction: float = 0.05

    def validate(self) -> None:
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(
                f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {self.on_bad_row!r}"
            )
        if self.min_count is not None and self.min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {self.min_count}")
        if len(self.fractions) != 3 or min(self.fractions) < 0 or self.fractions[0] <= 0:
            raise ValueError(
                f"fractions must be 3 non-negative shares with train > 0, got {self.fractions}"
            )
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"fractions must sum to 1, got {self.fractions} (sum {sum(self.fractions)})"
            )
        if not 0.0 <= self.max_dropped_fraction <= 1.0:
            raise ValueError(
                f"max_dropped_fraction must be in [0, 1], got {self.max_dropped_fraction}"
            )
        if self.block_bytes < 1 << 10 or self.rows_per_shard < 1:
            raise ValueError("block_bytes must be at least 1 KiB and rows_per_shard positive")

    def with_defaults(self, min_count: int, split: str) -> PrepareOptions:
        """These options with a format's defaults filled in where they were left ``None``."""
        return replace(
            self,
            min_count=self.min_count if self.min_count is not None else min_count,
            split=self.split or split,
        )


class Format(ABC):
    """How one dataset's raw columns become a label, dense floats and categorical tokens.

    Subclasses set ``name`` and, in ``__init__``, ``columns`` (raw columns, file order),
    ``label_columns``, ``dropped_columns``, ``dense``, ``sparse`` and ``multi_valued``; the
    ``transform`` must be vectorised over a chunk and must also work with ``labeled=False``
    (serving: records carry no label).
    """

    name: ClassVar[str]
    columns: list[str]
    label_columns: tuple[str, ...]
    dropped_columns: tuple[str, ...] = ()
    dense: list[str]
    sparse: list[str]
    # Multi-valued raw columns, each the multi-hot field of the same name, with the separator
    # that joins their values in text.
    multi_valued: dict[str, str] = {}

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def feature_columns(self) -> list[str]:
        """The raw fields a record may give :class:`RawEncoder` (no label, no dropped column)."""
        skip = {*self.label_columns, *self.dropped_columns}
        return [c for c in self.columns if c not in skip]

    def sparse_fields(self, cardinalities: dict[str, int]) -> list[SparseField]:
        return [SparseField(f, cardinalities[f], f in self.multi_valued) for f in self.sparse]

    def describe(self) -> dict[str, Any]:
        """What ``meta.json`` records to rebuild this format (see :meth:`from_config`)."""
        return {"format": self.name, "config": asdict(self.config)}

    @property
    def sources(self) -> dict[str, str] | None:
        """Each feature (dense and sparse) -> the one raw column its value is computed from,
        when every feature depends on one column of its own row only; ``None`` (the default)
        when that is not declared. Serving memoises encodings per raw value with it."""
        return None

    @property
    def fitted_fields(self) -> list[str]:
        """Sparse fields whose vocabulary :meth:`fit` derives from train statistics (quantile
        buckets) instead of counted tokens; ``transform`` yields their tokens once fitted."""
        return []

    def observe(self, features: Features, train: np.ndarray) -> None:  # noqa: B027
        """Pass 1 shows each chunk's features and its train-row mask (for :meth:`fit`)."""

    def fit(self) -> dict[str, list[str]]:
        """After pass 1: each fitted field's tokens in id order (id 1 first)."""
        return {}

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> Format:
        """The format described by ``meta.options["config"]``."""

    @abstractmethod
    def transform(self, raw: pa.Table, issues: Issues, labeled: bool = True) -> Features:
        """Raw string columns -> features; flags bad rows in ``issues`` instead of raising."""


class FileReader:
    """The chunks of a list of sources, one source after another."""

    def __init__(self, sources: Sequence[TextSource | ParquetSource]) -> None:
        if not sources:
            raise BadInputError("no input files given")
        for s in sources:
            if not s.path.is_file():
                raise BadInputError(f"{s.path}: no such file")
        self.sources = list(sources)
        self.side_rejected: list[Rejection] = []  # bad rows of auxiliary files (MovieLens)

    @property
    def paths(self) -> list[str]:
        return [str(s.path) for s in self.sources]

    def count_rows(self, source: int, block_bytes: int) -> int:
        return self.sources[source].count_rows(block_bytes)

    def chunks(self, source: int, block_bytes: int) -> Iterator[RawChunk]:
        return self.sources[source].chunks(block_bytes)


# ---------------------------------------------------------------------------------------- splits


@dataclass
class SplitPlan:
    """The split of every data row as a pure function of (source index, row position).

    ``random``: a seeded hash of (seed, source, position) against ``fractions``.
    ``ranges``: per source, half-open position ranges ``(start, stop, split)``; a source
    without ranges is not read at all.
    """

    kind: str
    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    ranges: list[list[tuple[int, int, str]]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)

    def assign(self, source: int, positions: np.ndarray) -> np.ndarray:
        """Split codes (index into ``SPLITS``; -1 = not used) of rows at ``positions``."""
        if self.kind == "random":
            key = splitmix64(np.array([self.seed * 1_000_003 + source], dtype=np.uint64))
            u = (splitmix64(positions.astype(np.uint64) ^ key) >> np.uint64(11)) * 2.0**-53
            bounds = np.cumsum(self.fractions)[:-1]
            return np.searchsorted(bounds, u, side="right").astype(np.int8)
        codes = np.full(len(positions), -1, dtype=np.int8)
        for start, stop, split in self.ranges[source]:
            codes[(positions >= start) & (positions < stop)] = SPLITS.index(split)
        return codes

    def end(self, source: int, split: str) -> int | None:
        """The position after the last row of ``split`` in ``source`` (``None``: anywhere)."""
        if self.kind == "random":
            return None
        return max((b for a, b, s in self.ranges[source] if s == split), default=0)

    def uses(self, source: int, split: str | None = None) -> bool:
        if self.kind == "random":
            return split is None or self.fractions[SPLITS.index(split)] > 0
        return any(split in (None, s) and a < b for a, b, s in self.ranges[source])

    def describe(self) -> dict[str, Any]:
        if self.kind == "random":
            return {"kind": "random", "seed": self.seed, "fractions": list(self.fractions)}
        # A range reaching END_OF_SOURCE is written with stop null: "to the end of the file".
        return {
            "kind": self.kind,
            **self.description,
            "ranges": [
                [[a, None if b == END_OF_SOURCE else b, s] for a, b, s in rs] for rs in self.ranges
            ],
        }


def random_split(
    seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> SplitPlan:
    return SplitPlan("random", seed=seed, fractions=tuple(fractions))


def ordered_split(row_counts: Sequence[int], fractions: tuple[float, float, float]) -> SplitPlan:
    """Rows in file order: the first ``fractions[0]`` of all rows train, then valid, then test."""
    total = sum(row_counts)
    n_train = int(total * fractions[0])
    n_valid = int(total * fractions[1])
    return global_ranges(
        row_counts,
        [
            (0, n_train, "train"),
            (n_train, n_train + n_valid, "valid"),
            (n_train + n_valid, total, "test"),
        ],
        kind="ordered",
        fractions=list(fractions),
    )


def global_ranges(
    row_counts: Sequence[int], ranges: list[tuple[int, int, str]], kind: str, **description: Any
) -> SplitPlan:
    """A plan from ranges over the concatenation of all sources, cut into per-source ranges."""
    per_source = []
    offset = 0
    for n in row_counts:
        own = []
        for start, stop, split in ranges:
            a, b = max(start, offset), min(stop, offset + n)
            if a < b:
                own.append((a - offset, b - offset, split))
        per_source.append(own)
        offset += n
    return SplitPlan(
        kind, ranges=per_source, description={"row_counts": list(row_counts), **description}
    )


def standard_split(reader: FileReader, options: PrepareOptions) -> SplitPlan:
    """The ``random`` or ``ordered`` split that ``options`` asks for."""
    if options.split == "random":
        return random_split(options.seed, options.fractions)
    if options.split == "ordered":
        counts = count_rows(reader, range(len(reader.sources)), options)
        return ordered_split(counts, options.fractions)
    raise ValueError(f"split must be random or ordered, got {options.split!r}")


def count_rows(reader: FileReader, sources: Sequence[int], options: PrepareOptions) -> list[int]:
    """Data lines per source (a cheap pre-pass for splits that depend on positions)."""
    counts = []
    with progress_bar(len(sources), "count lines", unit="files", show=options.progress) as bar:
        for i in sources:
            counts.append(reader.count_rows(i, options.block_bytes))
            bar.update(1)
    return counts


# -------------------------------------------------------------------------------------- bad rows


class BadRows:
    """Counts malformed rows per reason with their first ``path:line`` examples.

    With ``policy="fail"`` the first bad row raises :class:`BadInputError`. With ``record``
    off (the counting pass, which the encoding pass repeats) rows are only checked, so
    each bad row is reported once.
    """

    def __init__(self, policy: str, max_examples: int = 5, record: bool = True) -> None:
        self.policy = policy
        self.max_examples = max_examples
        self.record = record
        self.reasons: dict[str, dict[str, Any]] = {}
        self.first_detail: dict[str, str] = {}  # per reason, what was wrong with its first row

    @property
    def total(self) -> int:
        return sum(r["count"] for r in self.reasons.values())

    def add(
        self, path: str, rejected: list[Rejection], flags: list[Flag], lines: np.ndarray
    ) -> None:
        if not rejected and not flags:
            return
        if self.policy == "fail":
            self._raise_first(path, rejected, flags, lines)
        if not self.record:
            return
        for r in rejected:
            self.first_detail.setdefault(r.reason, r.detail)
            self._count(r.reason, None, [r.line], r.path)
        for f in flags:
            if f.reason not in self.first_detail and f.values is not None:
                value = f.values[int(np.argmax(f.mask))].as_py()
                self.first_detail[f.reason] = f"field {f.field!r} value {value!r}"
            self._count(f.reason, f.field, lines[f.mask], path)

    def report(self) -> dict[str, Any]:
        return {k: dict(v) for k, v in sorted(self.reasons.items())}

    def summary(self) -> str:
        lines = [f"{self.total:,} bad rows skipped:"]
        for reason, r in sorted(self.reasons.items()):
            fields = r.get("fields", {})
            where = " in " + ", ".join(f"{k} ({v:,})" for k, v in fields.items()) if fields else ""
            examples = list(r["examples"])
            if examples and reason in self.first_detail:
                examples[0] += f" ({self.first_detail[reason]})"
            lines.append(f"  {reason}: {r['count']:,}{where}, e.g. {', '.join(examples)}")
        return "\n".join(lines)

    def headline(self) -> str:
        """The most frequent reason in one line: count, first example and what was wrong."""
        reason, r = max(self.reasons.items(), key=lambda kv: kv[1]["count"])
        first = r["examples"][0] if r["examples"] else "?"
        detail = f": {self.first_detail[reason]}" if reason in self.first_detail else ""
        return f"{reason} {r['count']:,}, e.g. {first}{detail}"

    def _count(self, reason: str, field: str | None, lines: Sequence[int], path: str) -> None:
        entry = self.reasons.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += len(lines)
        room = self.max_examples - len(entry["examples"])
        entry["examples"] += [f"{path}:{int(n)}" for n in lines[:room]]
        if field is not None:
            fields = entry.setdefault("fields", {})
            fields[field] = fields.get(field, 0) + len(lines)

    def _raise_first(
        self, path: str, rejected: list[Rejection], flags: list[Flag], lines: np.ndarray
    ) -> None:
        candidates = [(r.line, f"{r.path}:{r.line}: {r.reason}: {r.detail}") for r in rejected]
        for f in flags:
            i = int(np.argmax(f.mask))
            value = f" (value {f.values[i].as_py()!r})" if f.values is not None else ""
            candidates.append(
                (int(lines[i]), f"{path}:{lines[i]}: {f.reason} in field {f.field!r}{value}")
            )
        raise BadInputError(min(candidates)[1] + " (policy --on-bad-row fail)")


# ------------------------------------------------------------------------------------ vocabulary


class ValueCounter:
    """Train counts of one field's distinct values, merged chunk by chunk.

    Per-chunk ``value_counts`` tables are merged with a hash group-by whenever they outgrow
    the merged table, so memory stays proportional to the number of distinct values.
    """

    MERGE_ROWS = 1 << 18  # pending distinct values that trigger a merge (at least)

    def __init__(self) -> None:
        self._merged: pa.Table | None = None
        self._parts: list[pa.Table] = []
        self._pending = 0
        self.missing = 0

    def add(self, tokens: pa.Array) -> None:
        if pa.types.is_list(tokens.type):
            tokens = tokens.flatten()
        self.missing += tokens.null_count
        counts = pc.value_counts(tokens.drop_null())
        self._parts.append(
            pa.table({"value": counts.field("values"), "count": counts.field("counts")})
        )
        self._pending += len(counts)
        merged = len(self._merged) if self._merged is not None else 0
        if self._pending > max(merged, self.MERGE_ROWS):
            self._merge()

    def result(self) -> tuple[pa.Array, np.ndarray]:
        """Distinct values sorted ascending (bytewise) and their counts."""
        self._merge()
        table = (
            self._merged
            if self._merged is not None
            else pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        )
        table = table.take(pc.sort_indices(table["value"]))
        return as_array(table["value"]), table["count"].to_numpy()

    def _merge(self) -> None:
        parts = ([self._merged] if self._merged is not None else []) + self._parts
        if not self._parts:
            return
        merged = pa.concat_tables(parts).group_by("value").aggregate([("count", "sum")])
        self._merged = merged.select(["value", "count_sum"]).rename_columns(["value", "count"])
        self._parts, self._pending = [], 0


@dataclass
class FieldVocab:
    """Raw token -> id for one field: ``values[i]`` has id ``i + 1``; anything else is 0."""

    values: pa.Array

    @property
    def cardinality(self) -> int:
        return len(self.values) + 1

    def lookup(self, tokens: pa.Array) -> pa.Array:
        """int32 ids of string tokens, or list<int32> for lists of tokens."""
        tokens = as_array(tokens)
        if pa.types.is_list(tokens.type):
            offsets = tokens.offsets.to_numpy()
            ids = self.lookup(tokens.flatten())
            return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)), ids)
        index = pc.index_in(tokens, value_set=self.values)
        return pc.add(index, 1).fill_null(0).cast(pa.int32())


def build_vocab(counter: ValueCounter, min_count: int) -> tuple[FieldVocab, np.ndarray, int]:
    """The field's vocabulary, its train counts by id (OOV at 0) and its distinct values."""
    values, counts = counter.result()
    remap, cardinality = frequency_order(counts, min_count)
    kept = np.flatnonzero(remap)
    by_id = kept[np.argsort(remap[kept])]
    frequencies = encoded_counts(remap, counts, cardinality)
    frequencies[0] += counter.missing
    return FieldVocab(values.take(pa.array(by_id))), frequencies, len(values)


# ------------------------------------------------------------------------------------ the engine


def prepare_dataset(
    fmt: Format,
    reader: FileReader,
    out: str | os.PathLike,
    plan: SplitPlan,
    options: PrepareOptions,
    name: str | None = None,
) -> DatasetMeta:
    """Runs both passes and writes a prepared dataset to ``out`` (see the module docstring)."""
    options.validate()
    final = Path(out)
    # Built beside and renamed into place: a failed run leaves a previous dataset whole.
    try:
        check_output_dir(final, "prepared dataset", is_prepared_dataset, options.overwrite)
    except OutputExistsError as e:
        raise BadInputError(str(e)) from None
    with replace_dir(final, "prepared dataset", is_prepared_dataset, options.overwrite) as staging:
        meta = _prepare_into(fmt, reader, staging, final, plan, options, name)
    meta.root = final.absolute()
    # The summary prints with or without progress bars: a quiet success still says what it made.
    rows = ", ".join(f"{s} {meta.rows(s):,}" for s in SPLITS)
    ids = sum(f.cardinality for f in meta.sparse)
    bad = sum(r.get("count", 0) for r in meta.bad_rows.values())
    dropped = f"; {bad:,} bad rows skipped" if bad else ""
    print(
        f"{final}: {rows} rows; {len(meta.dense)} dense and {len(meta.sparse)} sparse fields, "
        f"{ids:,} ids{dropped}",
        file=sys.stderr,
    )
    return meta


def _prepare_into(
    fmt: Format,
    reader: FileReader,
    out: Path,
    final: Path,
    plan: SplitPlan,
    options: PrepareOptions,
    name: str | None,
) -> DatasetMeta:
    """Both passes into the staging directory ``out``; messages name ``final``."""
    min_count = options.min_count or 1
    vocabs, frequencies, distinct, lines_counted = _count_train_values(
        fmt, reader, plan, options, out
    )
    all_oov = [f for f, v in vocabs.items() if v.cardinality == 1 and distinct.get(f, 0) > 0]
    if all_oov and options.min_count and options.min_count > 1:
        print(
            f"{final}: warning: --min-count {options.min_count} maps every value of "
            f"{len(all_oov)} of {len(vocabs)} fields ({', '.join(all_oov[:5])}) to OOV: none of "
            "their values is that frequent in train; lower --min-count",
            file=sys.stderr,
        )
    sparse = fmt.sparse_fields({f: v.cardinality for f, v in vocabs.items()})
    # The counting pass read every line when any line may be train (random split).
    total = lines_counted if plan.kind == "random" else None
    splits, bad, lines_read, fitted_counts = _encode_splits(
        fmt, reader, plan, vocabs, sparse, out, options, total
    )
    frequencies.update(fitted_counts)
    save_frequencies(out, {f.name: frequencies[f.name] for f in sparse})
    if bad.total:
        print(f"{final}: {bad.summary()}", file=sys.stderr)
    if splits["train"].rows == 0:
        why = f" ({bad.headline()}){label_hint(fmt, bad)}" if bad.total else ""
        raise BadInputError(
            f"{reader.paths}: no usable train rows in {lines_read:,} lines read{why}"
        )
    check_dropped(
        bad, lines_read + len(reader.side_rejected), options.max_dropped_fraction, final, fmt
    )
    meta = DatasetMeta(
        name=name or fmt.name,
        label=LABEL,
        dense=list(fmt.dense),
        sparse=sparse,
        splits=splits,
        options={
            **fmt.describe(),
            "min_count": min_count,
            "split": plan.describe(),
            "on_bad_row": options.on_bad_row,
            "sources": reader.paths,
        },
        bad_rows=bad.report(),
        extra={"raw_distinct_train_values": distinct, "lines_read": lines_read},
        root=out,
    )
    meta.save(out)
    return meta


def check_dropped(
    bad: BadRows, lines: int, max_fraction: float, out: Path, fmt: Format | None = None
) -> None:
    """Fails (before ``meta.json`` is written) when bad rows exceed ``max_fraction`` of the
    lines read: the message gives the counts, the main reason and its first example."""
    if not lines or bad.total <= max_fraction * lines:
        return
    raise BadInputError(
        f"{out}: {bad.total:,} of {lines:,} rows were bad ({bad.total / lines:.1%}; "
        f"{bad.headline()}), more than --max-dropped-fraction {max_fraction:g}; fix the input "
        f"(a truncated or mismatched file?) or raise the limit{label_hint(fmt, bad)}. "
        "No dataset was written"
    )


def label_hint(fmt: Format | None, bad: BadRows) -> str:
    """For a table whose labels are mostly text it was not told how to read: the flags."""
    if fmt is None or fmt.name != "table" or not bad.reasons:
        return ""
    reason = max(bad.reasons, key=lambda k: bad.reasons[k]["count"])
    if reason != "bad_label" or getattr(getattr(fmt, "config", None), "positive", None):
        return ""
    return (
        "; a label given as text needs --positive VALUE and --negative VALUE (e.g. "
        "--positive yes --negative no)"
    )


def _count_train_values(
    fmt: Format, reader: FileReader, plan: SplitPlan, options: PrepareOptions, out: Path
) -> tuple[dict[str, FieldVocab], dict[str, np.ndarray], dict[str, int], int]:
    """Pass 1: counts train tokens (and shows the format its train rows, for fitted fields),
    saves the vocabulary; returns the vocabularies, the train counts by id of the counted
    fields, the distinct train values per field and the lines read."""
    fitted = set(fmt.fitted_fields)
    counters = {f: ValueCounter() for f in fmt.sparse if f not in fitted}
    gate = BadRows(options.on_bad_row, record=False)  # pass 2 reports; this one only fails
    gate.add("", reader.side_rejected, [], np.empty(0))
    lines = 0
    with _bar("count (train)", options) as bar:
        for i in range(len(reader.sources)):
            if not plan.uses(i, "train"):
                continue
            end = plan.end(i, "train")
            chunks = _transformed(fmt, reader, i, plan, gate, options.block_bytes)
            for chunk, features, keep, codes in chunks:
                if end is not None and len(chunk.positions) and chunk.positions[0] >= end:
                    break
                train = keep & (codes == 0)
                fmt.observe(features, train)
                for f, counter in counters.items():
                    counter.add(_rows(as_array(features.tokens[f]), train))
                read = chunk.table.num_rows + len(chunk.rejected)
                lines += read
                bar.update(read)
    vocabs, frequencies, distinct = {}, {}, {}
    for f, counter in counters.items():
        vocabs[f], frequencies[f], distinct[f] = build_vocab(counter, options.min_count or 1)
    for f, tokens in fmt.fit().items():
        vocabs[f], distinct[f] = FieldVocab(pa.array(tokens, pa.string())), len(tokens)
    vocabs = {f: vocabs[f] for f in fmt.sparse}
    save_vocab(out, {f: (v.values, np.arange(1, v.cardinality)) for f, v in vocabs.items()})
    return vocabs, frequencies, distinct, lines


def _encode_splits(
    fmt: Format,
    reader: FileReader,
    plan: SplitPlan,
    vocabs: dict[str, FieldVocab],
    sparse: list[SparseField],
    out: Path,
    options: PrepareOptions,
    total: int | None,
) -> tuple[dict[str, SplitInfo], BadRows, int, dict[str, np.ndarray]]:
    """Pass 2: encodes every row into its split's shards; returns the splits, the bad-row
    report, the lines read and the train counts by id of the format's fitted fields."""
    fitted = {f: np.zeros(vocabs[f].cardinality, dtype=np.int64) for f in fmt.fitted_fields}
    block_bytes = encode_block_bytes(options.block_bytes, vocabs)
    schema = arrow_schema(LABEL, fmt.dense, sparse)
    writers = {s: ShardWriter(out, s, schema, options.rows_per_shard) for s in SPLITS}
    bad = BadRows(options.on_bad_row, options.max_examples)
    bad.add("", reader.side_rejected, [], np.empty(0))
    lines = 0
    with _bar("encode", options, total) as bar:
        for i in range(len(reader.sources)):
            if not plan.uses(i):
                continue
            for chunk, features, keep, codes in _transformed(
                fmt, reader, i, plan, bad, block_bytes
            ):
                table = encode_features(fmt, features, keep, vocabs)
                codes = codes[keep]
                for f, counts in fitted.items():
                    ids = table[f].to_numpy(zero_copy_only=False)[codes == 0]
                    counts += np.bincount(ids, minlength=len(counts))
                for code, split in enumerate(SPLITS):
                    in_split = codes == code
                    if in_split.any():
                        writers[split].write(_rows(table, in_split))
                read = chunk.table.num_rows + len(chunk.rejected)
                lines += read
                bar.update(read)
    return {s: w.close() for s, w in writers.items()}, bad, lines, fitted


def encode_block_bytes(block_bytes: int, vocabs: dict[str, FieldVocab]) -> int:
    """Raw bytes per encoded chunk: at least ``block_bytes``, and ~64 bytes per kept id.

    Looking a chunk up builds a hash of each field's vocabulary (``pc.index_in``), so
    chunks grow with the vocabulary (up to ``MAX_BLOCK_BYTES``) to keep that cost a small
    share of parsing the chunk; memory stays proportional to the vocabulary, as the counting
    pass already needs.
    """
    return max(block_bytes, min(64 * sum(v.cardinality for v in vocabs.values()), MAX_BLOCK_BYTES))


def _transformed(
    fmt: Format,
    reader: FileReader,
    source: int,
    plan: SplitPlan,
    bad: BadRows,
    block_bytes: int,
) -> Iterator[tuple[RawChunk, Features, np.ndarray, np.ndarray]]:
    """Transformed chunks of one source with the keep mask and split codes of output rows."""
    for chunk in prefetch(reader.chunks(source, block_bytes)):
        issues = Issues(chunk.table.num_rows)
        features = fmt.transform(chunk.table, issues, labeled=True)
        bad.add(chunk.path, chunk.rejected, issues.first_reasons(), chunk.lines)
        good = ~issues.bad_mask()
        codes = plan.assign(source, chunk.positions)
        if features.source_rows is not None:
            good, codes = good[features.source_rows], codes[features.source_rows]
        yield chunk, features, good & (codes >= 0), codes


def encode_features(
    fmt: Format, features: Features, keep: np.ndarray, vocabs: dict[str, FieldVocab]
) -> pa.Table:
    """The prepared columns (label, dense, sparse ids) of the rows ``keep`` selects."""
    columns: dict[str, pa.Array] = {}
    if features.label is not None:
        columns[LABEL] = pa.array(features.label[keep], pa.float32())
    for d in fmt.dense:
        columns[d] = pa.array(features.dense[d][keep], pa.float32())
    for f in fmt.sparse:
        columns[f] = vocabs[f].lookup(_rows(as_array(features.tokens[f]), keep))
    return pa.table(columns)


def _rows(data: pa.Array | pa.Table, mask: np.ndarray) -> pa.Array | pa.Table:
    """The rows ``mask`` selects; no copy when it selects them all (the common case)."""
    return data if mask.all() else data.filter(pa.array(mask))


def _bar(desc: str, options: PrepareOptions, total: int | None = None) -> Any:
    return progress_bar(
        total,
        desc,
        unit="rows",
        show=options.progress,
        unit_scale=True,
        mininterval=1.0,
        smoothing=0.1,
    )
