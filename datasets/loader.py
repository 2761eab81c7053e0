"""Batches of a prepared split as ``torchrec.datasets.utils.Batch``.

Shards are decoded once into column arrays (sparse ids field-major, so a batch is one gather
per field) and kept in memory up to ``cache_rows``; larger splits stream shard by shard.
Shuffling permutes the shard order and the rows inside each shard, seeded by (seed, epoch),
so a run resumed at (epoch, batch) sees exactly the batches it would have seen. With
``prefetch > 0`` a background thread assembles the next batches while the model trains on
the current one (parquet decoding and numpy gathers release the GIL), as TorchRec's train
pipelines overlap input with compute; the batches and their order are the same.

Example::

    loader = BatchLoader("data/synth", "train", batch_size=4096, shuffle=True, seed=0)
    for batch in loader.epoch(0):
        batch.dense_features, batch.sparse_features, batch.labels
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from datasets.prefetch import prefetched
from datasets.prepared import DatasetMeta, PreparedDataError, iter_tables

PAD_LABEL = -1.0  # label of rows that only pad a short last batch to equal per-rank size


@dataclass
class _Columns:
    """One shard decoded: labels [n], dense [n, d], single-hot ids [F, n], multi-hot bags."""

    labels: np.ndarray
    dense: np.ndarray
    single: np.ndarray
    multi: list[tuple[np.ndarray, np.ndarray]]  # (offsets [n+1], values) per multi-hot field

    @property
    def rows(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> _Columns:
        """A copy of just ``rows`` (in that order)."""
        multi = []
        for bag in self.multi:
            values, lengths = _gather_bags(bag, rows)
            multi.append((np.concatenate([[0], np.cumsum(lengths)]), values))
        return _Columns(self.labels[rows], self.dense[rows], self.single[:, rows], multi)


def _check_batch_size(batch_size: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")


def _share_bounds(rows: int, low: float, high: float) -> tuple[int, int]:
    """The first and past-the-last row of the share ``[low, high)`` of ``rows`` rows."""
    return int(rows * low), int(rows * high)


class BatchLoader:
    """Iterates one split of a prepared dataset in batches.

    With ``world_size > 1`` every rank walks the same global batches and keeps its own
    contiguous slice of each, so a data-parallel run sees exactly what one process would.
    """

    def __init__(
        self,
        data: str | Path | DatasetMeta,
        split: str,
        batch_size: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        cache_rows: int = 20_000_000,
        prefetch: int = 0,
    ) -> None:
        self.meta = data if isinstance(data, DatasetMeta) else DatasetMeta.load(data)
        _check_batch_size(batch_size, world_size)
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.files = self.meta.files(split)
        self.rows = self.meta.rows(split)
        self.keys = self.meta.sparse_names
        self._single = [i for i, f in enumerate(self.meta.sparse) if not f.multi_hot]
        self._multi = [i for i, f in enumerate(self.meta.sparse) if f.multi_hot]
        self._cache: dict[int, _Columns] | None = {} if self.rows <= cache_rows else None
        self.prefetch = prefetch
        self.row_share = (0.0, 1.0)
        self.pin_memory = False

    def share(self, low: float, high: float) -> BatchLoader:
        """The rows ``[low, high)`` of every shard, as shares of its rows (``share(0, .9)`` and
        ``share(.9, 1)`` split the split in two disjoint parts that cover it), sharing the
        decoded shards. Shard sizes come from the parquet footers."""
        import pyarrow.parquet as pq

        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"a row share needs 0 <= low < high <= 1, got [{low}, {high})")
        other = copy.copy(self)
        other.row_share = (low, high)
        other.rows = 0
        for path in self.files:
            first, stop = _share_bounds(pq.read_metadata(path).num_rows, low, high)
            other.rows += stop - first
        return other

    def resized(self, batch_size: int, shuffle: bool, drop_last: bool) -> BatchLoader:
        """The same split in other batches, sharing the decoded shards (no second read)."""
        _check_batch_size(batch_size, self.world_size)
        other = copy.copy(self)
        other.batch_size, other.shuffle, other.drop_last = batch_size, shuffle, drop_last
        return other

    def pinned(self) -> BatchLoader:
        """The same batches in page-locked memory (on the prefetch thread when there is one),
        so copies to a CUDA device run asynchronously; needs CUDA."""
        other = copy.copy(self)
        other.pin_memory = True
        return other

    def __len__(self) -> int:
        full, rest = divmod(self.rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of one epoch, skipping the first ``start_batch`` (for resuming)."""
        batches = self._epoch(epoch, start_batch)
        if self.pin_memory:
            batches = (b.pin_memory() for b in batches)
        if self.prefetch > 0:
            return prefetched(batches, self.prefetch, name="batch-prefetch")
        return batches

    def _epoch(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.files)) if self.shuffle else np.arange(len(self.files))
        carry: list[tuple[_Columns, np.ndarray]] = []
        carried = 0
        index = 0
        for shard in order:
            cols = self._shard(int(shard))
            first, stop = _share_bounds(cols.rows, *self.row_share)
            rows = first + (
                rng.permutation(stop - first) if self.shuffle else np.arange(stop - first)
            )
            pos = 0
            while pos < len(rows):
                take = min(self.batch_size - carried, len(rows) - pos)
                carry.append((cols, rows[pos : pos + take]))
                carried += take
                pos += take
                if carried == self.batch_size:
                    if index >= start_batch:
                        yield self._batch(carry)
                    index += 1
                    carry, carried = [], 0
            # A batch that spans shards keeps only its rows of this one, not the whole decoded
            # shard: with a small row share (a few rows of every shard) a batch would otherwise
            # hold dozens of decoded shards at once, a count that grows with the split.
            # Only the last entry can be this shard's; the earlier ones were cut at their own.
            if carry and carry[-1][0] is cols:
                carry[-1] = (cols.take(carry[-1][1]), np.arange(len(carry[-1][1])))
        if carried and not self.drop_last and index >= start_batch:
            yield self._batch(carry)

    def _shard(self, i: int) -> _Columns:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        (table,) = iter_tables([self.files[i]])
        cols = self._decode(table, self.files[i])
        if self._cache is not None:
            self._cache[i] = cols
        return cols

    def _decode(self, table: pa.Table, path: Path) -> _Columns:
        meta = self.meta
        missing = [
            c for c in [meta.label, *meta.dense, *meta.sparse_names] if c not in table.column_names
        ]
        if missing:
            raise PreparedDataError(f"{path}: missing columns {missing}")
        labels = table[meta.label].to_numpy().astype(np.float32)
        dense = (
            np.stack([table[d].to_numpy().astype(np.float32) for d in meta.dense], axis=1)
            if meta.dense
            else np.zeros((len(labels), 0), dtype=np.float32)
        )
        single = (
            np.stack([table[meta.sparse[i].name].to_numpy().astype(np.int64) for i in self._single])
            if self._single
            else np.zeros((0, len(labels)), dtype=np.int64)
        )
        multi = []
        for i in self._multi:
            col = table[meta.sparse[i].name].combine_chunks()
            offsets = col.offsets.to_numpy().astype(np.int64)
            multi.append((offsets - offsets[0], col.flatten().to_numpy().astype(np.int64)))
        for row, f in enumerate(self._single):
            _check_ids(single[row], meta.sparse[f].name, meta.sparse[f].cardinality, path)
        for (_, values), f in zip(multi, self._multi, strict=True):
            _check_ids(values, meta.sparse[f].name, meta.sparse[f].cardinality, path)
        bad = ~((labels >= 0) & (labels <= 1))  # NaN included
        if bad.any():
            i = int(np.argmax(bad))
            raise PreparedDataError(
                f"{path}: row {i} has label {labels[i]} in column {meta.label!r}; "
                "expected a click label in [0, 1] (re-prepare the dataset)"
            )
        if dense.size and not np.isfinite(dense).all():
            i, j = (int(x[0]) for x in np.nonzero(~np.isfinite(dense)))
            raise PreparedDataError(
                f"{path}: row {i} has {dense[i, j]} in dense column {meta.dense[j]!r}; "
                "expected a finite number"
            )
        return _Columns(labels, dense, single, multi)

    def _batch(self, parts: list[tuple[_Columns, np.ndarray]]) -> Batch:
        if self.world_size > 1:
            parts = self._rank_share(parts)
        labels = np.concatenate([c.labels[r] for c, r in parts])
        dense = np.concatenate([c.dense[r] for c, r in parts])
        single = np.concatenate([c.single[:, r] for c, r in parts], axis=1)
        n = len(labels)
        values: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(self.keys)
        lengths: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(self.keys)
        for row, f in enumerate(self._single):
            values[f] = single[row]
            lengths[f] = np.ones(n, dtype=np.int64)
        for m, f in enumerate(self._multi):
            bags = [_gather_bags(c.multi[m], r) for c, r in parts]
            values[f] = np.concatenate([v for v, _ in bags])
            lengths[f] = np.concatenate([ln for _, ln in bags])
        if self.world_size > 1 and n > self._real_rows:
            labels[self._real_rows :] = PAD_LABEL
        kjt = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=n,
        )
        return Batch(
            dense_features=torch.from_numpy(dense),
            sparse_features=kjt,
            labels=torch.from_numpy(labels),
        )

    def _rank_share(
        self, parts: list[tuple[_Columns, np.ndarray]]
    ) -> list[tuple[_Columns, np.ndarray]]:
        """This rank's contiguous share of a global batch given as (shard, rows) pieces.

        Every rank gets the same number of rows (sharded embedding collectives need equal
        local batches); a short last batch is padded with copies of its final row, labelled
        ``PAD_LABEL`` so evaluation can drop them.
        """
        total = sum(len(r) for _, r in parts)
        per = -(-total // self.world_size)
        lo, hi = self.rank * per, (self.rank + 1) * per
        out, seen = [], 0
        for cols, rows in parts:
            a, b = max(lo - seen, 0), min(hi - seen, len(rows))
            if a < b:
                out.append((cols, rows[a:b]))
            seen += len(rows)
        self._real_rows = sum(len(r) for _, r in out)
        if self._real_rows < per:
            cols, rows = parts[-1]
            out.append((cols, np.repeat(rows[-1:], per - self._real_rows)))
        return out


def _check_ids(ids: np.ndarray, name: str, cardinality: int, path: Path) -> None:
    """Every id of a field lies in [0, cardinality); the offending value is reported."""
    if not len(ids):
        return
    low, high = ids.min(), ids.max()
    if low < 0 or high >= cardinality:
        value = low if low < 0 else high
        raise PreparedDataError(
            f"{path}: field {name!r} has id {value} outside [0, {cardinality}) "
            "(meta.json's cardinality); re-prepare the dataset"
        )


def _gather_bags(
    bags: tuple[np.ndarray, np.ndarray], rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    offsets, values = bags
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    total = int(lengths.sum())
    # position k of the output reads values[starts[bag] + (k - first output slot of bag)]
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return values[shift + np.arange(total)], lengths
