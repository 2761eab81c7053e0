"""Pass 1's token counts and the vocabulary they give: ids by descending train frequency.

Example::

    counter = ValueCounter()
    counter.add(pa.array(["a", "b", "a", None]))
    vocab, frequencies, distinct = build_vocab(counter, min_count=1)
    vocab.lookup(pa.array(["a", "zzz"]))  # [1, 0]: "a" is the most frequent, 0 = OOV
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets.prepare.columns import as_array
from datasets.prepared import encoded_counts, frequency_order


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

    def add_counts(self, values: pa.Array, counts: np.ndarray, missing: int) -> None:
        """Merges another counter's :meth:`result` and missing count (a worker's piece)."""
        self.missing += missing
        self._parts.append(pa.table({"value": values, "count": pa.array(counts, pa.int64())}))
        self._pending += len(values)
        merged = len(self._merged) if self._merged is not None else 0
        if self._pending > max(merged, self.MERGE_ROWS):
            self._merge()

    def result(self, ordered: bool = True) -> tuple[pa.Array, np.ndarray]:
        """Distinct values sorted ascending (bytewise) and their counts; ``ordered=False``
        skips the sort (a piece's counts, which the driver merges and sorts once)."""
        self._merge()
        table = (
            self._merged
            if self._merged is not None
            else pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        )
        if ordered:
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
