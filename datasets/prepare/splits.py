"""Which split each row goes to, as a pure function of (source file, row position).

:class:`FileReader` yields a list of sources' chunks in order; a :class:`SplitPlan` assigns
each row to train/valid/test from its source and position alone, so pass 1 knows a row's
split without reading ahead: ``random`` (a seeded hash against fractions), ``ordered``
(file order) or per-source position ranges (Criteo's day files).

Example::

    plan = random_split(seed=0, fractions=(0.8, 0.1, 0.1))
    plan.assign(source=0, positions=np.arange(10))  # split codes, index into SPLITS
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datasets.prepare.base import PrepareOptions
from datasets.prepare.sources import BadInputError, ParquetSource, RawChunk, Rejection, TextSource
from datasets.prepared import SPLITS
from datasets.progress import progress_bar
from datasets.synthetic import splitmix64

END_OF_SOURCE = 1 << 62  # the stop of a split range that takes a whole file


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

    def chunks(
        self, source: int, block_bytes: int, span: tuple[int, int, int] | None = None
    ) -> Iterator[RawChunk]:
        """The chunks of one source, or of its ``span``: ``(start byte, stop byte, first
        line)`` of a plain text file (a piece of ``--workers``)."""
        if span is None:
            return self.sources[source].chunks(block_bytes)
        start, stop, first_line = span
        return self.sources[source].chunks(block_bytes, start, stop, first_line)


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
