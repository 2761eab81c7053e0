"""Both preprocessing passes over several processes (``--workers N``) or a Ray cluster
(``--executor ray``), giving the ids, rows and shards of one process.

The inputs are cut into *pieces*: a plain text file into byte ranges that start on a line
start (about 4 per worker, at least ``block_bytes`` each), a gzip or parquet file whole. A
cheap first wave counts the line breaks of every range, so each piece knows the number of
its first line and every row its position: splits (a function of source and position) and
bad-row reports come out as one process's.

1. **Count**: each piece counts its train tokens into per-field ``(value, count)`` tables;
   the driver merges them as they arrive, in piece order, and only then applies
   ``min_count`` and assigns ids (descending count, ties by value), so the vocabulary is the
   one a single process builds. A format that fits fields on train rows itself (quantile
   buckets: a seeded reservoir, whose sample depends on the order it sees rows in) counts in
   the driver, as one process does; its encoding is still parallel.
2. **Encode**: each piece reads the saved vocabulary from the staging directory, encodes its
   rows and writes them per split as Arrow IPC files into ``.pieces/`` there; the driver
   appends those, in piece order, to the split's shard writer, so the shards hold the same
   rows in the same order and files as one process writes (only parquet row-group
   boundaries may differ), and removes them.

Results are taken in piece order, with at most two pieces per worker in flight (bounded
memory), so with ``on_bad_row="fail"`` the error is the first bad row of the file, as
serially. Progress advances per piece. Workers write only into the staging directory, which
:func:`datasets.io.replace_dir` removes if anything fails; on a Ray cluster every node must
see the input and output paths (a shared file system), as ``ctr sweep run --executor ray``
assumes.

Example::

    options = PrepareOptions(workers=4)          # or executor="ray", address="auto"
    prepare_criteo(["train.txt"], "data/criteo", options=options)
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from datasets.io import atomic_path
from datasets.prepare.base import LABEL, Format, PrepareOptions
from datasets.prepare.engine import (
    BadRows,
    _bar,
    _count_train_values,
    build_vocabs,
    count_chunks,
    encode_block_bytes,
    encode_chunks,
    fitted_counters,
    new_counters,
)
from datasets.prepare.sources import (
    BadInputError,
    TextSource,
    count_newlines,
    is_gzip,
    line_aligned_cuts,
)
from datasets.prepare.splits import FileReader, SplitPlan
from datasets.prepare.vocab import FieldVocab
from datasets.prepared import (
    SPLITS,
    VOCAB_FILE,
    ShardWriter,
    SparseField,
    SplitInfo,
    arrow_schema,
)

PIECES_PER_WORKER = 4  # enough for even progress and load balance, few enough to merge
PIECES_DIR = ".pieces"  # inside the staging directory; removed before it is renamed


@dataclass(frozen=True)
class Piece:
    """One unit of work: a whole source (``span`` None) or the byte range
    ``span = (start, stop, first line)`` of a plain text source."""

    source: int
    span: tuple[int, int, int] | None = None

    def first_position(self, reader: FileReader) -> int:
        first_line = self.span[2] if self.span is not None else 1
        return max(first_line - reader.sources[self.source].first_data_line, 0)


class ParallelPasses:
    """The engine's two passes (``count`` and ``encode``, with the serial ones' signatures)
    run piece by piece on a pool of ``options.workers`` processes or Ray tasks."""

    def __init__(
        self, fmt: Format, reader: FileReader, plan: SplitPlan, options: PrepareOptions, out: Path
    ) -> None:
        self.pool = _RayPool(options) if options.executor == "ray" else _LocalPool(options)
        try:
            self.pieces = plan_pieces(reader, plan, options, self.pool)
        except BaseException:
            self.pool.close()
            raise

    def close(self) -> None:
        self.pool.close()

    def count(
        self,
        fmt: Format,
        reader: FileReader,
        plan: SplitPlan,
        options: PrepareOptions,
        out: Path,
    ) -> tuple[dict[str, FieldVocab], dict[str, np.ndarray], dict[str, int], int]:
        if fmt.fitted_fields:  # its fit depends on the order of the rows: one process counts
            return _count_train_values(fmt, reader, plan, options, out)
        counters = new_counters(fmt)
        gate = BadRows(options.on_bad_row, record=False)
        gate.add("", reader.side_rejected, [], np.empty(0))
        pieces = [p for p in self.pieces if _counts_train(p, reader, plan)]
        tasks = [(fmt, reader, plan, p, options.on_bad_row, options.block_bytes) for p in pieces]
        lines = 0
        with _bar("count (train)", options) as bar:
            for counted, read in self.pool.map(_count_piece, tasks):
                for f, (values, counts, missing) in counted.items():
                    counters[f].add_counts(values, counts, missing)
                lines += read
                bar.update(read)
        return (*build_vocabs(fmt, counters, options, out), lines)

    def encode(
        self,
        fmt: Format,
        reader: FileReader,
        plan: SplitPlan,
        vocabs: dict[str, FieldVocab],
        sparse: list[SparseField],
        out: Path,
        options: PrepareOptions,
        total: int | None,
    ) -> tuple[dict[str, SplitInfo], BadRows, int, dict[str, np.ndarray]]:
        fitted = fitted_counters(fmt, vocabs)
        schema = arrow_schema(LABEL, fmt.dense, sparse)
        writers = {s: ShardWriter(out, s, schema, options.rows_per_shard) for s in SPLITS}
        bad = BadRows(options.on_bad_row, options.max_examples)
        bad.add("", reader.side_rejected, [], np.empty(0))
        pieces = [p for p in self.pieces if plan.uses(p.source)]
        folder = out / PIECES_DIR
        folder.mkdir()
        tasks = [
            (fmt, reader, plan, p, str(folder / f"{i:06d}"), str(out), sparse, options)
            for i, p in enumerate(pieces)
        ]
        lines = 0
        with _bar("encode", options, total) as bar:
            for stem, (files, piece_bad, read, piece_fitted) in zip(
                (t[4] for t in tasks), self.pool.map(_encode_piece, tasks), strict=True
            ):
                for split in files:
                    path = Path(f"{stem}-{split}.arrow")
                    with pa.memory_map(str(path)) as source:
                        part = ipc.open_file(source)
                        for b in range(part.num_record_batches):
                            writers[split].write(pa.Table.from_batches([part.get_batch(b)]))
                    path.unlink()
                bad.merge(piece_bad)
                for f, counts in piece_fitted.items():
                    fitted[f] += counts
                lines += read
                bar.update(read)
        shutil.rmtree(folder)
        return {s: w.close() for s, w in writers.items()}, bad, lines, fitted


def plan_pieces(
    reader: FileReader, plan: SplitPlan, options: PrepareOptions, pool: _Pool
) -> list[Piece]:
    """The pieces of every source the plan reads, in file order (see the module docstring)."""
    used = [i for i in range(len(reader.sources)) if plan.uses(i)]
    sizes = {i: reader.sources[i].path.stat().st_size for i in used}
    target = max(
        options.block_bytes,
        math.ceil(sum(sizes.values()) / (PIECES_PER_WORKER * options.workers)),
    )
    ranges: list[tuple[int, int, int]] = []  # (source, start, stop) of split text files
    pieces: list[Piece | None] = []
    for i in used:
        source = reader.sources[i]
        splittable = isinstance(source, TextSource) and not is_gzip(source.path)
        cuts = line_aligned_cuts(source.path, math.ceil(sizes[i] / target)) if splittable else []
        if len(cuts) <= 2:
            pieces.append(Piece(i))
            continue
        for a, b in zip(cuts[:-1], cuts[1:], strict=False):
            ranges.append((i, a, b))
            pieces.append(None)  # filled in once its first line is known
    tasks = [(str(reader.sources[i].path), a, b) for i, a, b in ranges]
    counts = iter(pool.map(count_newlines_task, tasks))
    spans: list[Piece] = []
    line, previous = 1, None
    for i, a, b in ranges:
        if i != previous:
            line, previous = 1, i
        spans.append(Piece(i, (a, b, line)))
        line += next(counts)
    it = iter(spans)
    return [p if p is not None else next(it) for p in pieces]


def _counts_train(piece: Piece, reader: FileReader, plan: SplitPlan) -> bool:
    """Whether pass 1 reads this piece: its source holds train rows and the train range of
    a position split does not end before the piece starts."""
    if not plan.uses(piece.source, "train"):
        return False
    end = plan.end(piece.source, "train")
    return end is None or piece.first_position(reader) < end


# --- what a worker runs (module-level functions, so that spawn and Ray can pickle them) ---


def count_newlines_task(path: str, start: int, stop: int) -> int:
    return count_newlines(Path(path), start, stop)


def _count_piece(
    fmt: Format, reader: FileReader, plan: SplitPlan, piece: Piece, policy: str, block_bytes: int
) -> tuple[dict[str, tuple[pa.Array, np.ndarray, int]], int]:
    """Pass 1 over one piece: each counted field's distinct train values, their counts and
    missing count, and the lines read."""
    counters = new_counters(fmt)
    gate = BadRows(policy, record=False)
    lines = sum(
        count_chunks(fmt, reader, piece.source, plan, gate, block_bytes, counters, piece.span)
    )
    return {f: (*c.result(ordered=False), c.missing) for f, c in counters.items()}, lines


def _encode_piece(
    fmt: Format,
    reader: FileReader,
    plan: SplitPlan,
    piece: Piece,
    stem: str,
    staging: str,
    sparse: list[SparseField],
    options: PrepareOptions,
) -> tuple[list[str], BadRows, int, dict[str, np.ndarray]]:
    """Pass 2 over one piece: writes ``<stem>-<split>.arrow`` per split it has rows of;
    returns those splits, its bad-row report, the lines read and the fitted fields' counts."""
    vocabs = _staged_vocabs(staging, fmt.sparse)
    fitted = fitted_counters(fmt, vocabs)
    block_bytes = encode_block_bytes(options.block_bytes, vocabs)
    schema = arrow_schema(LABEL, fmt.dense, sparse)
    bad = BadRows(options.on_bad_row, options.max_examples)
    lines = 0
    writers: dict[str, ipc.RecordBatchFileWriter] = {}
    with ExitStack() as files:
        for read, parts in encode_chunks(
            fmt, reader, piece.source, plan, bad, block_bytes, vocabs, fitted, piece.span
        ):
            for split, part in parts.items():
                if split not in writers:
                    tmp = files.enter_context(atomic_path(f"{stem}-{split}.arrow"))
                    writers[split] = files.enter_context(ipc.new_file(str(tmp), schema))
                writers[split].write_table(part.select(schema.names).cast(schema))
            lines += read
    return [s for s in SPLITS if s in writers], bad, lines, fitted


_VOCABS: dict[str, dict[str, FieldVocab]] = {}  # per worker process: staging dir -> vocabs


def _staged_vocabs(staging: str, fields: list[str]) -> dict[str, FieldVocab]:
    """The vocabulary pass 1 saved in the staging directory (read once per process); its
    fields are stored one after another, values in id order."""
    if staging not in _VOCABS:
        table = pq.read_table(Path(staging) / VOCAB_FILE, columns=["field", "value"])
        runs = pc.value_counts(table["field"])  # in order of first appearance
        vocabs, at = {}, 0
        for run in runs:
            name, n = run["values"].as_py(), run["counts"].as_py()
            vocabs[name] = FieldVocab(table["value"].slice(at, n).combine_chunks())
            at += n
        _VOCABS.clear()
        _VOCABS[staging] = vocabs
    vocabs = _VOCABS[staging]
    return {f: vocabs.get(f, FieldVocab(pa.array([], pa.string()))) for f in fields}


# --- executors ---


class _Pool:
    """Runs a function over argument tuples; results come back in order, with at most
    ``window`` calls in flight."""

    window: int

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[Any]:
        pending: deque[Any] = deque()
        for args in tasks:
            pending.append(self._submit(fn, args))
            if len(pending) >= self.window:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def _submit(self, fn: Callable[..., Any], args: tuple) -> Any:
        raise NotImplementedError

    def _result(self, handle: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _LocalPool(_Pool):
    """``workers`` spawned processes on this machine, each with an equal share of the CPUs
    for Arrow's own threads."""

    def __init__(self, options: PrepareOptions) -> None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.window = 2 * options.workers
        self.pool = ProcessPoolExecutor(
            options.workers,
            mp_context=mp.get_context("spawn"),  # no fork of a parent's Arrow threads
            initializer=_init_worker,
            initargs=(max(1, (cpus or 1) // options.workers),),
        )

    def _submit(self, fn: Callable[..., Any], args: tuple) -> Any:
        return self.pool.submit(fn, *args)

    def _result(self, handle: Any) -> Any:
        try:
            return handle.result()
        except BrokenProcessPool:
            raise OSError(
                "a --workers process died (killed, or out of memory?); no dataset was written"
            ) from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(threads: int) -> None:
    pa.set_cpu_count(threads)


class _RayPool(_Pool):
    """Ray tasks of one CPU each, at most ``2 * workers`` in flight, on the cluster at
    ``address`` or a private local instance of ``workers`` CPUs (``None`` or ``"local"``)."""

    def __init__(self, options: PrepareOptions) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError("--executor ray needs Ray: pip install 'ctr-compress[ray]'") from None
        self.ray = ray
        self.window = 2 * options.workers
        self.pending: list[Any] = []
        self.started_here = not ray.is_initialized()
        if self.started_here:
            local = options.address in (None, "local")
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            ray.init(
                address=None if local else options.address,
                num_cpus=options.workers if local else None,
                runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
                include_dashboard=False,
                log_to_driver=False,
            )
        self._remote: dict[Callable[..., Any], Any] = {}

    def _submit(self, fn: Callable[..., Any], args: tuple) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(num_cpus=1)(fn)
        ref = self._remote[fn].remote(*args)
        self.pending.append(ref)
        return ref

    def _result(self, handle: Any) -> Any:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, (BadInputError, ValueError, OSError)):
                raise cause from None
            raise
        finally:
            self.pending.remove(handle)

    def close(self) -> None:
        for ref in self.pending:  # a failed run stops its other tasks before staging goes
            self.ray.cancel(ref, force=True)
        self.pending.clear()
        if self.started_here:
            self.ray.shutdown()
