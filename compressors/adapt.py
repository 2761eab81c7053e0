"""``adapt`` — frequency-aware hybrid embeddings (AdaptEmb; DeepRec's Adaptive Embedding).

The frequent values of every field keep collisionless rows of their own; the long tail shares
a few salted-hash buckets. Frequent values carry most of the training signal and suffer most
from collisions, rare values have little to lose, so at equal bytes the hybrid beats plain
hashing. Ids are frequency-ordered by preprocessing (id 1 the most frequent; id 0 the OOV
bucket), so field ``f``'s head is simply ``id < H_f`` and its row is

    row = head_offset_f + id                              if id < H_f
          tail_offset_f + h(salt_f, id) mod T_f           otherwise

Budget: ``capacity = budget / row bytes`` rows. ``tail_fraction`` of them (default half) are
tail buckets; the rest are head rows, given greedily by frequency *across* fields: the
``capacity − tail`` values with the highest training counts, whichever field they belong
to, own rows (a value's count is capped by the counts of the more frequent ids of its field,
so each field's head stays a prefix; OOV id 0 always leads its field's head). Fields of at
most ``threshold`` values are kept whole first when the head rows can hold them. Tail buckets
go to fields in proportion to their tail sizes (``shared_tail=False``), or form one block that
every field's tail hashes into with its own salt (``shared_tail=True``, multiplexed). Without
training frequencies (feature specs built by hand) each field's head is the same fraction
of its vocabulary.

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

from compressors.base import FeatureSpec
from compressors.hash64 import stable_salt
from compressors.hashing import (
    DEFAULT_THRESHOLD,
    HashRule,
    SaltedHashMap,
    budget_error,
    direct_layout,
    keep_small_fields,
    proportional_rows,
)
from compressors.registry import register
from compressors.storage import Lookup, TableSpec, row_bytes
from compressors.tables import TableLayout, TableMethod


def frequency_heads(features: Sequence[FeatureSpec], slots: int,
                    eligible: Sequence[bool]) -> list[int]:
    """Head sizes ``H_f``: the ``slots`` most frequent values over all ``eligible`` fields.

    Each field's counts are made non-increasing along its ids (id 0 first) so that the chosen
    values form a prefix of every field; ties go to earlier fields. Fields without
    frequencies fall back to the same head fraction everywhere.
    """
    sizes = [f.cardinality for f in features]
    if slots <= 0:
        return [0] * len(sizes)
    if any(f.frequencies is None for f, e in zip(features, eligible, strict=True) if e):
        share = iter(proportional_rows([n for n, e in zip(sizes, eligible, strict=True) if e],
                                       slots, minimum=0))
        return [next(share) if e else 0 for e in eligible]
    envelopes = []
    for f, e in zip(features, eligible, strict=True):
        counts = np.asarray(f.frequencies, dtype=np.float64).copy() if e else np.zeros(0)
        if len(counts):
            counts[0] = np.inf
        envelopes.append(np.minimum.accumulate(counts))
    pooled = np.concatenate(envelopes)
    if slots >= len(pooled):
        return [len(env) for env in envelopes]
    cut = np.partition(pooled, len(pooled) - slots)[len(pooled) - slots]  # slots-th largest
    heads = [int(np.searchsorted(-env, -cut, side="left")) for env in envelopes]  # count > cut
    spare = slots - sum(heads)
    for i, env in enumerate(envelopes):
        ties = int(np.searchsorted(-env, -cut, side="right")) - heads[i]
        take = min(ties, spare)
        heads[i] += take
        spare -= take
    return heads


@register
class Adapt(TableMethod):
    """Frequent values own rows, the tail hashes into buckets; the budget solves the split."""

    name = "adapt"

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
            self.heads, self.tails = sizes, [0] * len(sizes)
            return direct_layout(self.features, self.dim, self.storage, self.seed)
        min_tail = 1 if self.shared_tail else len(sizes)
        if capacity < min_tail:
            raise budget_error(
                self.name, min_tail * row, self.budget_bytes, self.full_bytes,
                "every field needs a tail bucket (shared_tail=True needs one in all)")
        tail_rows = min(capacity, max(min_tail, round(self.tail_fraction * capacity)))
        head_rows = capacity - tail_rows
        keep = keep_small_fields(sizes, self.threshold, head_rows, rows_each_other=0)
        kept = sum(n for n, k in zip(sizes, keep, strict=True) if k)
        heads = frequency_heads(self.features, head_rows - kept, [not k for k in keep])
        heads = [n if k else h for n, h, k in zip(sizes, heads, keep, strict=True)]
        rest = [n - h for n, h in zip(sizes, heads, strict=True)]
        self.heads = heads
        if self.shared_tail:
            return self._shared_tail_layout(heads, rest, tail_rows)
        tails = iter(proportional_rows([r for r in rest if r], tail_rows))
        self.tails = [next(tails) if r else 0 for r in rest]
        return self._per_field_layout(heads, self.tails)

    def _salt(self, name: str) -> int:
        return stable_salt(name, 0, self.seed)

    def _per_field_layout(self, heads: list[int], tails: list[int]) -> TableLayout:
        names = self.feature_names
        rules, tables = [], []
        for i, (f, h, t) in enumerate(zip(self.features, heads, tails, strict=True)):
            if h + t >= f.cardinality:  # no tail, or a tail as large as the values it holds
                rules.append(HashRule.direct(i, f.cardinality, 0, self._salt(f.name)))
                tables.append(TableSpec(f"t_{f.name}", f.cardinality, self.dim, self.storage))
            else:
                rules.append(HashRule(i, h, 0, t, h, self._salt(f.name)))
                tables.append(TableSpec(f"t_{f.name}", h + t, self.dim, self.storage))
        return TableLayout(
            tables=tables,
            lookups=[Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)],
            index_map=SaltedHashMap(names, names, rules),
        )

    def _shared_tail_layout(self, heads: list[int], rest: list[int], buckets: int) -> TableLayout:
        names = self.feature_names
        start = sum(heads)  # heads first, then the shared tail block
        rules, offset = [], 0
        for i, (f, h, r) in enumerate(zip(self.features, heads, rest, strict=True)):
            if r:
                rules.append(HashRule(i, h, offset, buckets, start, self._salt(f.name)))
            else:
                rules.append(HashRule.direct(i, h, offset, self._salt(f.name)))
            offset += h
        self.tails = [buckets if r else 0 for r in rest]
        return TableLayout(
            tables=[TableSpec("adapt", start + buckets, self.dim, self.storage)],
            lookups=[Lookup(n, "adapt", field=i) for i, n in enumerate(names)],
            index_map=SaltedHashMap(names, names, rules),
        )

    def hyperparameters(self) -> dict[str, Any]:
        covered = None
        if all(f.frequencies is not None for f in self.features):
            total = sum(float(np.sum(f.frequencies)) for f in self.features)
            head = sum(float(np.sum(f.frequencies[:h])) for f, h in zip(self.features, self.heads,
                                                                         strict=True))
            covered = head / total if total else None
        names = self.feature_names
        return {
            **super().hyperparameters(), "tail_fraction": self.tail_fraction,
            "shared_tail": self.shared_tail, "threshold": self.threshold, "seed": self.seed,
            "head_per_field": dict(zip(names, self.heads, strict=True)),
            "tail_per_field": dict(zip(names, self.tails, strict=True)),
            "head_coverage": covered,
        }
