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
pass 1 without reading ahead (:mod:`datasets.prepare.splits`); the counting and the ids are
:mod:`datasets.prepare.vocab`'s; what a format provides is :mod:`datasets.prepare.base`'s
:class:`Format`. Malformed rows are counted per reason with their first
``file:line`` examples, or stop the run (``on_bad_row="fail"``); more than
``max_dropped_fraction`` of them fails the run before ``meta.json`` is written.

Example::

    fmt = CriteoFormat(CriteoConfig())
    reader = FileReader([TextSource("train.txt", fmt.columns, "\\t")])
    meta = prepare_dataset(fmt, reader, "data/criteo", random_split(seed=0),
                           PrepareOptions(min_count=10))
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from datasets.io import OutputExistsError, check_output_dir, replace_dir
from datasets.prepare.base import LABEL, Format, PrepareOptions
from datasets.prepare.columns import Features, Flag, Issues, as_array
from datasets.prepare.sources import (
    BadInputError,
    RawChunk,
    Rejection,
    prefetch,
)
from datasets.prepare.splits import FileReader, SplitPlan
from datasets.prepare.vocab import FieldVocab, ValueCounter, build_vocab
from datasets.prepared import (
    SPLITS,
    DatasetMeta,
    ShardWriter,
    SparseField,
    SplitInfo,
    arrow_schema,
    is_prepared_dataset,
    save_frequencies,
    save_vocab,
)
from datasets.progress import progress_bar

MAX_BLOCK_BYTES = 256 << 20  # the largest chunk the vocabulary size may ask for


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

    def merge(self, other: BadRows) -> None:
        """Adds the report of the rows after ours (a later piece of ``--workers``): counts
        add up and examples keep file order, as if one process had read both."""
        for reason, detail in other.first_detail.items():
            self.first_detail.setdefault(reason, detail)
        for reason, r in other.reasons.items():
            entry = self.reasons.setdefault(reason, {"count": 0, "examples": []})
            entry["count"] += r["count"]
            room = self.max_examples - len(entry["examples"])
            entry["examples"] += r["examples"][: max(room, 0)]
            for field, n in r.get("fields", {}).items():
                fields = entry.setdefault("fields", {})
                fields[field] = fields.get(field, 0) + n

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
    if options.parallel:
        # Imported here: the parallel driver builds on this module's passes.
        from datasets.prepare.parallel import ParallelPasses

        parallel = contextlib.closing(ParallelPasses(fmt, reader, plan, options, out))
    else:
        parallel = contextlib.nullcontext()
    with parallel as passes:
        count = passes.count if passes is not None else _count_train_values
        encode = passes.encode if passes is not None else _encode_splits
        vocabs, frequencies, distinct, lines_counted = count(fmt, reader, plan, options, out)
        all_oov = [f for f, v in vocabs.items() if v.cardinality == 1 and distinct.get(f, 0) > 0]
        if all_oov and options.min_count and options.min_count > 1:
            print(
                f"{final}: warning: --min-count {options.min_count} maps every value of "
                f"{len(all_oov)} of {len(vocabs)} fields ({', '.join(all_oov[:5])}) to OOV: "
                "none of their values is that frequent in train; lower --min-count",
                file=sys.stderr,
            )
        sparse = fmt.sparse_fields({f: v.cardinality for f, v in vocabs.items()})
        # The counting pass read every line when any line may be train (random split).
        total = lines_counted if plan.kind == "random" else None
        splits, bad, lines_read, fitted_counts = encode(
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
    counters = new_counters(fmt)
    gate = BadRows(options.on_bad_row, record=False)  # pass 2 reports; this one only fails
    gate.add("", reader.side_rejected, [], np.empty(0))
    lines = 0
    with _bar("count (train)", options) as bar:
        for i in range(len(reader.sources)):
            if not plan.uses(i, "train"):
                continue
            for read in count_chunks(fmt, reader, i, plan, gate, options.block_bytes, counters):
                lines += read
                bar.update(read)
    return build_vocabs(fmt, counters, options, out) + (lines,)


def new_counters(fmt: Format) -> dict[str, ValueCounter]:
    """A token counter per sparse field the format does not fit itself."""
    fitted = set(fmt.fitted_fields)
    return {f: ValueCounter() for f in fmt.sparse if f not in fitted}


def count_chunks(
    fmt: Format,
    reader: FileReader,
    source: int,
    plan: SplitPlan,
    gate: BadRows,
    block_bytes: int,
    counters: dict[str, ValueCounter],
    span: tuple[int, int, int] | None = None,
) -> Iterator[int]:
    """Counts the train tokens of one source (or of its ``span``), showing the format its
    train rows; yields the lines read per chunk."""
    end = plan.end(source, "train")
    for chunk, features, keep, codes in _transformed(
        fmt, reader, source, plan, gate, block_bytes, span
    ):
        if end is not None and len(chunk.positions) and chunk.positions[0] >= end:
            break
        train = keep & (codes == 0)
        fmt.observe(features, train)
        for f, counter in counters.items():
            counter.add(_rows(as_array(features.tokens[f]), train))
        yield chunk.table.num_rows + len(chunk.rejected)


def build_vocabs(
    fmt: Format, counters: dict[str, ValueCounter], options: PrepareOptions, out: Path
) -> tuple[dict[str, FieldVocab], dict[str, np.ndarray], dict[str, int]]:
    """After pass 1: the vocabularies (saved into ``out``), the train counts by id of the
    counted fields and the distinct train values per field."""
    vocabs, frequencies, distinct = {}, {}, {}
    for f, counter in counters.items():
        vocabs[f], frequencies[f], distinct[f] = build_vocab(counter, options.min_count or 1)
    for f, tokens in fmt.fit().items():
        vocabs[f], distinct[f] = FieldVocab(pa.array(tokens, pa.string())), len(tokens)
    vocabs = {f: vocabs[f] for f in fmt.sparse}
    save_vocab(out, {f: (v.values, np.arange(1, v.cardinality)) for f, v in vocabs.items()})
    return vocabs, frequencies, distinct


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
    fitted = fitted_counters(fmt, vocabs)
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
            for read, parts in encode_chunks(
                fmt, reader, i, plan, bad, block_bytes, vocabs, fitted
            ):
                for split, part in parts.items():
                    writers[split].write(part)
                lines += read
                bar.update(read)
    return {s: w.close() for s, w in writers.items()}, bad, lines, fitted


def fitted_counters(fmt: Format, vocabs: dict[str, FieldVocab]) -> dict[str, np.ndarray]:
    """Zeroed train counts by id of the format's fitted fields (pass 2 counts them)."""
    return {f: np.zeros(vocabs[f].cardinality, dtype=np.int64) for f in fmt.fitted_fields}


def encode_chunks(
    fmt: Format,
    reader: FileReader,
    source: int,
    plan: SplitPlan,
    bad: BadRows,
    block_bytes: int,
    vocabs: dict[str, FieldVocab],
    fitted: dict[str, np.ndarray],
    span: tuple[int, int, int] | None = None,
) -> Iterator[tuple[int, dict[str, pa.Table]]]:
    """Encodes one source (or its ``span``) chunk by chunk, adding the fitted fields' train
    ids to ``fitted``; yields the lines read and the encoded rows of each split present."""
    for chunk, features, keep, codes in _transformed(
        fmt, reader, source, plan, bad, block_bytes, span
    ):
        table = encode_features(fmt, features, keep, vocabs)
        codes = codes[keep]
        for f, counts in fitted.items():
            ids = table[f].to_numpy(zero_copy_only=False)[codes == 0]
            counts += np.bincount(ids, minlength=len(counts))
        parts = {}
        for code, split in enumerate(SPLITS):
            in_split = codes == code
            if in_split.any():
                parts[split] = _rows(table, in_split)
        yield chunk.table.num_rows + len(chunk.rejected), parts


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
    span: tuple[int, int, int] | None = None,
) -> Iterator[tuple[RawChunk, Features, np.ndarray, np.ndarray]]:
    """Transformed chunks of one source (or of its ``span``) with the keep mask and split
    codes of output rows."""
    chunks = (
        reader.chunks(source, block_bytes)
        if span is None
        else reader.chunks(source, block_bytes, span)
    )
    for chunk in prefetch(chunks):
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
