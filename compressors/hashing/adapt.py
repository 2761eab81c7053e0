"""``adapt`` — frequency-aware hybrid embeddings (AdaptEmb; DeepRec's Adaptive Embedding).

The frequent values of every field keep collisionless rows of their own; the long tail shares
a few salted-hash buckets. Frequent values carry most of the training signal and suffer most
from collisions, rare values have little to lose, so at equal bytes the hybrid beats plain
hashing. Ids are frequency-ordered by preprocessing (id 1 the most frequent; id 0 the OOV
bucket), so field ``f``'s head is a range of ids ``[s_f, H_f)`` (``s_f`` is 0, or 1 when the
OOV id is too rare to deserve a row) and its row is

    row = head_offset_f + id - s_f                        if s_f <= id < H_f
          tail_offset_f + h(salt_f, id) mod T_f           otherwise

Budget: ``capacity = budget / row bytes`` rows. ``tail_fraction`` of them (default half) are
tail buckets; the rest are head rows, given greedily by frequency *across* fields: the
``capacity − tail`` values with the highest training counts, whichever field they belong
to, own rows (a value's count is capped by the counts of the more frequent ids of its field,
so each field's head stays a range; the OOV id competes on its own count). Fields of at
most ``threshold`` values are kept whole first, smallest first, while the head rows can hold
them (greedily: those that fit stay whole even when not all do). Tail buckets
go to fields in proportion to their tail sizes (``shared_tail=False``), or form one block that
every field's tail hashes into with its own salt (``shared_tail=True``, multiplexed). Without
training frequencies (feature specs built by hand) each field's head is the same fraction
of its vocabulary.

Options: ``tail_fraction``, ``shared_tail``, ``threshold``, ``seed``, ``storage``,
``init_scale`` (``option_help`` says each).

Deviations from the Hetu/DeepRec versions: they keep a remap array (one int32 per value) that
sends each value to a frequent row or a rare bucket; since ids here are already frequency
ordered, the split is one integer per field and the artifact holds no remap (a remap would
cost 4 bytes per value and cap the ratio near ``dim`` x). Hetu's ``top_percent`` (the head
share of values, fixed per run) becomes a split solved from the budget, and DeepRec's
dynamic promotion of values that become frequent during training is out of scope: the split
is fixed before training from the training counts, so it is deterministic and exportable.

Example::

    layer = build_compressor("adapt", features, dim=16, budget="100x")
    layer = build_compressor("adapt", features, dim=16, budget="100x", shared_tail=True)
    layer.hyperparameters()["head_per_field"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from compressors.core.base import FeatureSpec
from compressors.core.hash64 import stable_salt
from compressors.core.registry import register
from compressors.core.storage import Lookup, TableSpec, row_bytes
from compressors.core.tables import TableLayout, TableMethod
from compressors.hashing.hash import (
    DEFAULT_THRESHOLD,
    HashRule,
    SaltedHashMap,
    budget_error,
    direct_layout,
    keep_small_fields,
    proportional_rows,
)


def frequency_heads(
    features: Sequence[FeatureSpec], slots: int, eligible: Sequence[bool]
) -> list[tuple[int, int]]:
    """Each field's head ``[start, stop)`` of ids: the ``slots`` most frequent values over all
    ``eligible`` fields.

    Ids ``1, 2, ...`` are taken as a prefix (their counts are made non-increasing along the
    ids); the OOV id 0 competes on its own count, so the head starts at 0 when it is chosen
    and at 1 otherwise. Ties go to earlier fields. Fields without frequencies fall back to
    the same head fraction everywhere (a prefix from id 0).
    """
    sizes = [f.cardinality for f in features]
    if slots <= 0:
        return [(0, 0)] * len(sizes)
    if any(f.frequencies is None for f, e in zip(features, eligible, strict=True) if e):
        share = iter(
            proportional_rows(
                [n for n, e in zip(sizes, eligible, strict=True) if e], slots, minimum=0
            )
        )
        return [(0, next(share)) if e else (0, 0) for e in eligible]
    if all(
        np.asarray(f.frequencies[:0]).dtype.kind in "iu"
        for f, e in zip(features, eligible, strict=True)
        if e
    ):
        return _integer_frequency_heads(features, slots, eligible)
    # One candidate list per field: [OOV count], then ids 1.. as a non-increasing envelope.
    candidates = []
    for f, e in zip(features, eligible, strict=True):
        counts = np.asarray(f.frequencies, dtype=np.float64) if e else np.zeros(0)
        candidates.append((counts[:1], np.minimum.accumulate(counts[1:])))
    pooled = np.concatenate([part for pair in candidates for part in pair])
    if slots >= len(pooled):
        return [(0, n) if e else (0, 0) for n, e in zip(sizes, eligible, strict=True)]
    cut = np.partition(pooled, len(pooled) - slots)[len(pooled) - slots]  # slots-th largest
    above = [
        (int(np.sum(oov > cut)), int(np.searchsorted(-env, -cut, side="left")))
        for oov, env in candidates
    ]
    spare = slots - sum(a + b for a, b in above)
    heads = []
    for (oov, env), (oov_in, taken) in zip(candidates, above, strict=True):
        if spare and len(oov) and oov[0] == cut:
            oov_in, spare = 1, spare - 1
        ties = int(np.searchsorted(-env, -cut, side="right")) - taken
        extra = min(ties, spare)
        taken, spare = taken + extra, spare - extra
        heads.append((0 if oov_in else 1, 1 + taken) if oov_in or taken else (0, 0))
    return heads


_SCAN_CHUNK = 1 << 20  # counts compared at a time by the integer heads' scans


def _prefix_at_least(counts: Any, value: int, limit: int | None = None) -> int:
    """How many of ids ``1, 2, ...`` lead with counts of at least ``value``: the length of
    the non-increasing envelope's part ``>= value``. Scanned in chunks of the (mapped)
    counts, up to ``limit`` of them."""
    n = len(counts) - 1 if limit is None else limit
    for start in range(1, n + 1, _SCAN_CHUNK):
        below = np.flatnonzero(np.asarray(counts[start : min(n + 1, start + _SCAN_CHUNK)]) < value)
        if len(below):
            return start - 1 + int(below[0])
    return n


def _integer_frequency_heads(
    features: Sequence[FeatureSpec], slots: int, eligible: Sequence[bool]
) -> list[tuple[int, int]]:
    """:func:`frequency_heads` for integer counts without a copy of them: the ``slots``-th
    largest candidate is the largest count ``c`` with at least ``slots`` candidates
    ``>= c``, found by bisection on ``c``; a field's candidates ``>= c`` are its OOV count's
    and the prefix of ids whose counts stay ``>= c`` (scanned from the mapped counts, a
    chunk at a time). Holds no per-id array (the pooled float64 envelopes and their
    partition were ~32 bytes per id); the same heads."""
    fields = [f.frequencies for f, e in zip(features, eligible, strict=True) if e]
    total = sum(len(c) for c in fields)
    if slots >= total:
        return [
            (0, f.cardinality) if e else (0, 0) for f, e in zip(features, eligible, strict=True)
        ]
    oovs = [int(c[0]) if len(c) else None for c in fields]
    # Each field's envelope starts at its count of id 1; nothing pooled exceeds the largest
    # of those and of the OOV counts.
    top = max([int(c[1]) for c in fields if len(c) > 1] + [o for o in oovs if o is not None])

    def at_least(value: int) -> int:
        return sum(
            (o is not None and o >= value) + _prefix_at_least(c, value)
            for c, o in zip(fields, oovs, strict=True)
        )

    lo, hi = min(0, top), top  # at_least(lo) >= slots always (every count is >= 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if at_least(mid) >= slots:
            lo = mid
        else:
            hi = mid - 1
    cut = lo
    above = [
        ((o is not None and o > cut), _prefix_at_least(c, cut + 1))
        for c, o in zip(fields, oovs, strict=True)
    ]
    spare = slots - sum(int(a) + b for a, b in above)
    heads, it = [], iter(zip(fields, oovs, above, strict=True))
    for e in eligible:
        if not e:
            heads.append((0, 0))
            continue
        counts, oov, (oov_in, taken) = next(it)
        oov_in = int(oov_in)
        if spare and oov is not None and oov == cut:
            oov_in, spare = 1, spare - 1
        ties = _prefix_at_least(counts, cut) - taken
        extra = min(ties, spare)
        taken, spare = taken + extra, spare - extra
        heads.append((0 if oov_in else 1, 1 + taken) if oov_in or taken else (0, 0))
    return heads


@register
class Adapt(TableMethod):
    """Frequent values own rows, the tail hashes into buckets; the budget solves the split."""

    name = "adapt"
    option_help = {
        "tail_fraction": "share of the rows given to the hashed tail",
        "shared_tail": "one tail table for every field instead of one per field",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        tail_fraction: float = 0.5,
        shared_tail: bool = False,
        threshold: int = DEFAULT_THRESHOLD,
        seed: int = 0,
        storage: str = "fp32",
        init_scale: float = 0.01,
    ) -> None:
        if not 0.0 < tail_fraction < 1.0:
            raise ValueError(f"adapt: tail_fraction must lie in (0, 1), got {tail_fraction}")
        self.tail_fraction = tail_fraction
        self.shared_tail = shared_tail
        self.threshold = threshold
        self.seed = seed
        super().__init__(features, dim, budget_bytes, storage=storage, init_scale=init_scale)

    def solve_layout(self) -> TableLayout:
        sizes = [f.cardinality for f in self.features]
        row = row_bytes(self.dim, self.storage)
        capacity = self.budget_bytes // row
        if capacity >= sum(sizes):
            self.heads, self.tails = [(0, n) for n in sizes], [0] * len(sizes)
            return direct_layout(self.features, self.dim, self.storage, self.seed)
        min_tail = 1 if self.shared_tail else len(sizes)
        if capacity < min_tail:
            raise budget_error(
                self.name,
                min_tail * row,
                self.budget_bytes,
                self.full_bytes,
                "every field needs a tail bucket (shared_tail=True needs one in all)",
            )
        tail_rows = min(capacity, max(min_tail, round(self.tail_fraction * capacity)))
        head_rows = capacity - tail_rows
        keep = keep_small_fields(sizes, self.threshold, head_rows, rows_each_other=0)
        kept = sum(n for n, k in zip(sizes, keep, strict=True) if k)
        heads = frequency_heads(self.features, head_rows - kept, [not k for k in keep])
        self.heads = [(0, n) if k else h for n, h, k in zip(sizes, heads, keep, strict=True)]
        rest = [n - (stop - start) for n, (start, stop) in zip(sizes, self.heads, strict=True)]
        if self.shared_tail:
            self.tails = [tail_rows if r else 0 for r in rest]
            return self._shared_tail_layout(rest, tail_rows)
        tails = iter(proportional_rows([r for r in rest if r], tail_rows))
        self.tails = [next(tails) if r else 0 for r in rest]
        return self._per_field_layout()

    def _salt(self, name: str) -> int:
        return stable_salt(name, 0, self.seed)

    def _per_field_layout(self) -> TableLayout:
        names = self.feature_names
        rules, tables = [], []
        for i, (f, (start, stop), t) in enumerate(
            zip(self.features, self.heads, self.tails, strict=True)
        ):
            head = stop - start
            if head + t >= f.cardinality:  # no tail, or a tail as large as the values it holds
                rules.append(HashRule.direct(i, f.cardinality, 0, self._salt(f.name)))
                tables.append(TableSpec(f"t_{f.name}", f.cardinality, self.dim, self.storage))
            else:
                rules.append(HashRule(i, start, stop, 0, t, head, self._salt(f.name)))
                tables.append(TableSpec(f"t_{f.name}", head + t, self.dim, self.storage))
        return TableLayout(
            tables=tables,
            lookups=[Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)],
            index_map=SaltedHashMap(names, names, rules),
        )

    def _shared_tail_layout(self, rest: list[int], buckets: int) -> TableLayout:
        names = self.feature_names
        tail_start = sum(stop - start for start, stop in self.heads)  # heads, then the tail
        rules, offset = [], 0
        for i, (f, (start, stop), r) in enumerate(
            zip(self.features, self.heads, rest, strict=True)
        ):
            if r:
                rules.append(
                    HashRule(i, start, stop, offset, buckets, tail_start, self._salt(f.name))
                )
            else:
                rules.append(HashRule.direct(i, f.cardinality, offset, self._salt(f.name)))
            offset += stop - start
        return TableLayout(
            tables=[TableSpec("adapt", tail_start + buckets, self.dim, self.storage)],
            lookups=[Lookup(n, "adapt", field=i) for i, n in enumerate(names)],
            index_map=SaltedHashMap(names, names, rules),
        )

    def hyperparameters(self) -> dict[str, Any]:
        covered = None
        if all(f.frequencies is not None for f in self.features):
            total = sum(float(np.sum(f.frequencies)) for f in self.features)
            head = sum(
                float(np.sum(f.frequencies[start:stop]))
                for f, (start, stop) in zip(self.features, self.heads, strict=True)
            )
            covered = head / total if total else None
        names = self.feature_names
        return {
            **super().hyperparameters(),
            "tail_fraction": self.tail_fraction,
            "shared_tail": self.shared_tail,
            "threshold": self.threshold,
            "seed": self.seed,
            "head_per_field": {n: list(h) for n, h in zip(names, self.heads, strict=True)},
            "tail_per_field": dict(zip(names, self.tails, strict=True)),
            "head_coverage": covered,
        }
