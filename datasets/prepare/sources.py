"""Streaming readers: raw files -> chunks of string columns with exact line numbers.

Text files (plain or gzip, detected by content) are read in blocks that end on a line
boundary, so the line number of every row is known exactly: each block is parsed with
pyarrow's CSV reader on one thread, whose invalid-row handler reports the lines with a
wrong column count, and rows with undecodable bytes or nothing on them are located in the
block's bytes. Those rows never reach a format's transform; they come back as
:class:`Rejection` s for the bad-row report.

Example::

    source = TextSource("train.txt", columns=CRITEO_COLUMNS, delimiter="\\t")
    for chunk in source.chunks(block_bytes=32 << 20):
        chunk.table, chunk.lines, chunk.rejected
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from datasets.prefetch import prefetched

GZIP_MAGIC = b"\x1f\x8b"


class BadInputError(ValueError):
    """Input that cannot be prepared; the message names the file, line and field."""


@dataclass(frozen=True)
class Rejection:
    """A row a reader could not turn into columns."""

    reason: str
    path: str
    line: int
    detail: str


@dataclass
class RawChunk:
    """Rows of one source: string columns, 1-based line numbers, and 0-based positions.

    A row's position is its index among the source's data lines, bad lines included, so it
    does not depend on which rows turned out malformed (splits are a function of it).
    """

    path: str
    table: pa.Table
    lines: np.ndarray
    positions: np.ndarray
    rejected: list[Rejection] = field(default_factory=list)


class TextSource:
    """A delimited text file with a fixed column list (and optionally a header line).

    ``delimiter`` may be several characters (MovieLens's ``::``); it is then rewritten to a
    control character before parsing. ``encoding`` other than UTF-8 is transcoded per block;
    lines that do not decode are rejected as ``bad_encoding``. ``include`` restricts the
    columns parsed; the column count of every line is still checked against ``columns``.
    """

    def __init__(
        self,
        path: str | Path,
        columns: list[str],
        delimiter: str,
        header: bool = False,
        encoding: str = "utf-8",
        quoted: bool = False,
        include: list[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.delimiter = delimiter
        self.header = header
        self.encoding = encoding
        self.quoted = quoted
        self.include = include

    @property
    def first_data_line(self) -> int:
        return 2 if self.header else 1

    def read_header(self) -> list[str]:
        """The names on the first line (for files whose columns come from their header)."""
        with _open(self.path) as f:
            line = f.readline()
        try:
            # A UTF-8 byte-order mark (Excel writes one) is not part of the first name.
            text = line.decode(self.encoding).rstrip("\r\n").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise BadInputError(f"{self.path}:1: header is not valid {self.encoding} ({e})") from e
        if not text:
            raise BadInputError(f"{self.path}:1: empty header line")
        if len(self.delimiter) > 1:
            return text.split(self.delimiter)
        return next(
            csv.reader([text], delimiter=self.delimiter, quotechar='"' if self.quoted else None)
        )

    def count_rows(self, block_bytes: int = 32 << 20) -> int:
        """Data lines in the file (bad ones included): the positions a split can refer to."""
        lines = sum(block.count(b"\n") for block, _ in _blocks(self.path, block_bytes))
        return max(lines - (1 if self.header else 0), 0)

    def chunks(
        self,
        block_bytes: int = 32 << 20,
        start: int = 0,
        stop: int | None = None,
        line: int = 1,
    ) -> Iterator[RawChunk]:
        """Chunks of the whole file, or of the bytes ``[start, stop)``: a range that begins on
        a line start whose number is ``line`` (a piece of ``--workers``; plain files only,
        a gzip stream cannot be entered in the middle)."""
        for block, first_line in _blocks(self.path, block_bytes, start, stop, line):
            if first_line == 1 and _is_utf8(self.encoding):
                block = block.removeprefix(UTF8_BOM)
            if first_line == 1 and self.header:
                cut = block.find(b"\n") + 1
                block, first_line = block[cut:], 2
                if not block:
                    continue
            yield self._parse(block, first_line)

    def _parse(self, block: bytes, first_line: int) -> RawChunk:
        path = str(self.path)
        rejected: list[Rejection] = []
        block, undecodable = self._decode(block, first_line)
        delimiter = self.delimiter
        if len(delimiter) > 1:
            block, delimiter = block.replace(delimiter.encode(), b"\x1f"), "\x1f"
        invalid: list[int] = []

        def on_invalid(row: pcsv.InvalidRow) -> str:
            line = first_line + row.number - 1
            invalid.append(row.number - 1)
            rejected.append(
                Rejection(
                    "wrong_column_count",
                    path,
                    line,
                    f"expected {row.expected_columns} columns, got {row.actual_columns}",
                )
            )
            return "skip"

        names = self.include or self.columns
        table = pcsv.read_csv(
            pa.py_buffer(block),
            read_options=pcsv.ReadOptions(
                column_names=self.columns, use_threads=False, block_size=len(block) + 1
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if self.quoted else False,
                ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in names},
                include_columns=names,
                strings_can_be_null=True,
                null_values=[""],
                quoted_strings_can_be_null=False,
                check_utf8=False,  # the block was decoded (validated) above
            ),
        )
        n_lines = block.count(b"\n")
        index = np.delete(np.arange(n_lines), np.asarray(invalid, dtype=np.int64))
        if len(index) != table.num_rows:  # a quoted value swallowed a line break
            line = first_line + _first_unbalanced_quote(block)
            raise BadInputError(
                f"{path}:{line}: a quoted value spans lines or its quote is not closed; "
                "rows can no longer be matched to lines (fix the quoting of this line)"
            )
        empty = _empty_lines(block)
        if len(empty):
            keep = ~np.isin(index, empty)
            for i in index[~keep]:
                line = first_line + int(i)
                if line in undecodable:
                    rejected.append(Rejection("bad_encoding", path, line, undecodable[line]))
                else:
                    rejected.append(Rejection("empty_row", path, line, "nothing on the line"))
            table, index = table.filter(pa.array(keep)), index[keep]
        rejected.sort(key=lambda r: r.line)
        lines = index + first_line
        return RawChunk(path, table, lines, lines - self.first_data_line, rejected)

    def _decode(self, block: bytes, first_line: int) -> tuple[bytes, dict[int, str]]:
        """The block as UTF-8, with undecodable lines blanked out: {line number: reason}."""
        try:
            text = block.decode(self.encoding)
            return (block if _is_utf8(self.encoding) else text.encode()), {}
        except UnicodeDecodeError:
            pass
        lines = block.split(b"\n")
        undecodable = {}
        for i, raw in enumerate(lines):
            try:
                lines[i] = raw.decode(self.encoding).encode()
            except UnicodeDecodeError as e:
                undecodable[first_line + i] = (
                    f"not valid {self.encoding}: {e.reason} at byte {e.start}"
                )
                lines[i] = b""
        return b"\n".join(lines), undecodable


class ParquetSource:
    """A parquet file; a row's "line" is its 1-based row number."""

    first_data_line = 1

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)

    def read_header(self) -> list[str]:
        return pq.ParquetFile(self.path).schema_arrow.names

    def count_rows(self, block_bytes: int = 0) -> int:
        return pq.ParquetFile(self.path).metadata.num_rows

    def chunks(self, block_bytes: int = 32 << 20, **whole_file: object) -> Iterator[RawChunk]:
        if whole_file:
            raise ValueError(f"{self.path}: a parquet source is read whole, not by byte range")
        pf = pq.ParquetFile(self.path)
        # Raw text is ~1 byte per parquet byte; aim for chunks of similar memory.
        row_bytes = max(pf.metadata.serialized_size // max(pf.metadata.num_rows, 1), 64)
        batch_rows = max(block_bytes // row_bytes, 1024)
        start = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=self.columns):
            # Columns keep their parquet types; the column helpers accept numbers and lists.
            table = pa.Table.from_batches([batch])
            positions = np.arange(start, start + batch.num_rows)
            start += batch.num_rows
            yield RawChunk(str(self.path), table, positions + 1, positions)


def read_all(
    source: TextSource, block_bytes: int = 32 << 20
) -> tuple[pa.Table, np.ndarray, list[Rejection]]:
    """A whole (small) file: its table, line numbers and rejected rows."""
    tables, lines, rejected = [], [], []
    for chunk in source.chunks(block_bytes):
        tables.append(chunk.table)
        lines.append(chunk.lines)
        rejected += chunk.rejected
    if not tables:
        raise BadInputError(f"{source.path}: no rows")
    return pa.concat_tables(tables), np.concatenate(lines), rejected


def prefetch(chunks: Iterator[RawChunk], depth: int = 2) -> Iterator[RawChunk]:
    """Reads (decompresses, parses) the next chunks on a thread while the caller encodes.

    pyarrow's parser and zlib release the GIL, so on two cores this roughly overlaps
    reading with encoding.
    """
    return prefetched(chunks, depth, name="read-ahead")


def line_aligned_cuts(path: Path, pieces: int) -> list[int]:
    """Byte offsets cutting a plain file into about ``pieces`` ranges, each starting on a
    line start: ``[0, ..., size]`` (fewer ranges when lines are longer than a range)."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        for j in range(1, pieces):
            f.seek(j * size // pieces)
            f.readline()  # to the start of the next line
            at = f.tell()
            if cuts[-1] < at < size:
                cuts.append(at)
    return [*cuts, size]


def count_newlines(path: Path, start: int, stop: int, block_bytes: int = 8 << 20) -> int:
    """Line breaks in the bytes ``[start, stop)`` of a plain file (where its ranges' lines
    start: a cheap read, no parsing)."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            data = f.read(min(block_bytes, left))
            if not data:
                break
            n += data.count(b"\n")
            left -= len(data)
    return n


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _blocks(
    path: Path, block_bytes: int, start: int = 0, stop: int | None = None, line: int = 1
) -> Iterator[tuple[bytes, int]]:
    """Blocks of whole lines, each ending with a newline, and the line number of their first;
    of the whole file, or of the bytes ``[start, stop)`` whose first line is ``line``."""
    carry = b""
    left = None if stop is None else stop - start
    try:
        with _open(path) as f:
            if start:
                f.seek(start)
            while left is None or left > 0:
                data = f.read(block_bytes if left is None else min(block_bytes, left))
                if not data:
                    break
                if left is not None:
                    left -= len(data)
                data = carry + data if carry else data
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
                block, carry = data[:cut], data[cut:]
                yield block, line
                line += block.count(b"\n")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise BadInputError(f"{path}: cannot read after line {line - 1} ({e})") from e
    if carry:
        yield carry + b"\n", line


def _empty_lines(block: bytes) -> np.ndarray:
    """0-based indices of the lines of ``block`` that hold nothing (or only a carriage return)."""
    if not (block.startswith((b"\n", b"\r\n")) or b"\n\n" in block or b"\n\r\n" in block):
        return np.empty(0, dtype=np.int64)
    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    length = ends - starts
    cr_only = (length == 1) & (data[np.minimum(starts, len(data) - 1)] == 13)
    return np.flatnonzero((length == 0) | cr_only)


def _first_unbalanced_quote(block: bytes) -> int:
    """0-based index of the first line of ``block`` with an odd number of quote characters."""
    for i, line in enumerate(block.split(b"\n")):
        if line.count(b'"') % 2:
            return i
    return 0


UTF8_BOM = b"\xef\xbb\xbf"


def _is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("-", "").replace("_", "") in ("utf8", "ascii")
