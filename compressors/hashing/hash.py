"""The hashing family: ``hash`` (the salted hashing trick) and ``unified`` (Unified Embedding).

**hash.** Each field's ids are hashed into rows: ``row = h(salt_f, v) mod M_f`` with a real 64-bit
integer hash (SplitMix64, :mod:`compressors.core.hash64`) and one salt per field, so the frequent
ids of different fields (all small numbers after frequency ordering) collide independently.
Per-field mode gives field ``f`` its own table of ``M_f ≈ r·n_f`` rows, ``r`` solved from the
budget; ``shared=True`` multiplexes every field into one table of ``M = budget / row bytes``
rows (feature multiplexing with one probe per field).

**unified** (Coleman et al., "Unified Embedding: Battle-Tested Feature Representations for
Web-Scale ML Systems", NeurIPS 2023). One table ``E ∈ R^{M×d_c}`` shared by all fields; field
``f`` makes ``k_f`` lookups with independent salted hashes (one salt per field *and* chunk)
and concatenates them, ``k_f·d_c = dim``. The buckets may be split over ``num_tables``
sub-tables for balance: (field, chunk) lookups are dealt to sub-tables round-robin as in the
TF reference, and every sub-table is its own TorchRec table so DMP can place them on
different ranks. A value that makes two probes only loses its vector entirely when *both*
collide with the same other value, so ``k > 1`` probes into a table of ``k``-times narrower
rows collide less harmfully than one probe at equal bytes.

``hash`` leaves fields of at most ``threshold`` values uncompressed (collisionless rows of
their own, like DLRM's ``--qr-threshold``): smallest first, greedily, while their rows take at
most ``keep_share`` (default half) of the budget's rows, so the large fields keep the rest;
per-field hashing also keeps a full table for any field that would not shrink. At 1000x the
kept share holds few or no small fields; the others are hashed. (``unified`` takes a
``threshold`` too, default 0.)

The OOV id 0 is hashed like any other id: it is a legitimate, usually frequent, bucket.

Options: ``hash``: ``shared``, ``threshold``, ``keep_share``, ``seed``, ``storage``,
``init_scale``; ``unified``: ``chunks``, ``field_chunks``, ``num_tables``, ``threshold`` and
the same ``seed``, ``storage``, ``init_scale`` (``option_help`` says each).

Deviations from the paper (``unified``): the reference hashes raw values with Keras' FarmHash
``Hashing`` layer salted by ``[feature index, chunk]``; here ids are already integers, and the
salt is a stable digest of ``(seed, field name, chunk)``. When per-field chunk counts give
several chunk widths, each width gets its own shared table (bytes split by vocabulary share),
since rows of one table have one width. ``unified`` multiplexes every field by default
(``threshold=0``, the paper's setting); a positive ``threshold`` keeps small fields out of the
shared table.

Example::

    layer = build_compressor("hash", features, dim=16, budget="100x")
    layer = build_compressor("hash", features, dim=16, budget="100x", shared=True)
    layer = build_compressor("unified", features, dim=16, budget="100x", chunks=2, num_tables=4)
    layer.hyperparameters()["rows_per_field"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from compressors.core.base import FeatureSpec
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.hash64 import mix64, stable_salt
from compressors.core.layout import IndexMap, register_index_map
from compressors.core.registry import register
from compressors.core.storage import Lookup, TableSpec, row_bytes
from compressors.core.tables import TableLayout, TableMethod

# Fields with at most this many values keep their own rows (DLRM's --qr-threshold default).
DEFAULT_THRESHOLD = 200
INT63 = (1 << 63) - 1


class FanOutMap(IndexMap):
    """An index map whose lookups each read one input field (several lookups may read the same).

    ``forward`` gathers, for every lookup in order, its field's values and lengths (one
    vectorised gather for all lookups), then :meth:`rows` maps them to table rows.
    """

    def __init__(
        self, features: Sequence[str], lookup_keys: Sequence[str], lookup_fields: Sequence[int]
    ) -> None:
        super().__init__(features, lookup_keys)
        if len(lookup_fields) != len(lookup_keys):
            raise ValueError("one source field per lookup is needed")
        if any(not 0 <= f < len(features) for f in lookup_fields):
            raise ValueError(f"lookup fields {list(lookup_fields)} outside {len(features)} fields")
        self._one_per_field = list(lookup_fields) == list(range(len(features)))
        self.register_buffer(
            "_lookup_fields", torch.tensor(list(lookup_fields), dtype=torch.int64), persistent=False
        )

    def rows(
        self, values: torch.Tensor, per_value: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Table rows of ``values`` (all lookups' values, lookup after lookup), elementwise.

        ``per_value(p)`` expands a per-lookup tensor ``p`` to broadcast against ``values``
        (``values`` is ``[lookups, n]`` when every lookup has ``n`` values, else flat).
        """
        raise NotImplementedError

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        features = self.check_keys(features)
        values, lengths = features.values(), features.lengths()
        per_key = features.length_per_key()
        num_fields, fields = len(self.features), self._lookup_fields
        if len(set(per_key)) == 1:
            # Every field has as many values (single-hot fields): a [fields, n] view fans out
            # by rows, and per-lookup parameters broadcast instead of being expanded per value.
            table = values.view(num_fields, per_key[0])
            if not self._one_per_field:
                table = table.index_select(0, fields)
                lengths = lengths.view(num_fields, -1).index_select(0, fields).reshape(-1)
            rows = self.rows(table, lambda param: param.unsqueeze(1)).reshape(-1)
        else:
            counts = torch.tensor(per_key, dtype=torch.int64, device=values.device)
            if not self._one_per_field:
                seg_len = counts[fields]
                seg_start = (torch.cumsum(counts, 0) - counts)[fields]
                out_start = torch.cumsum(seg_len, 0) - seg_len
                total = int(seg_len.sum())
                # Value i of lookup l lands at out_start[l] + i, copying input seg_start[l] + i.
                shift = torch.repeat_interleave(seg_start - out_start, seg_len, output_size=total)
                values = values.index_select(0, torch.arange(total, device=values.device) + shift)
                lengths = lengths.view(num_fields, -1).index_select(0, fields).reshape(-1)
                counts = seg_len
            size = values.numel()
            rows = self.rows(
                values, lambda param: torch.repeat_interleave(param, counts, output_size=size)
            )
        return KeyedJaggedTensor(
            keys=self.lookup_keys, values=rows, lengths=lengths, stride=features.stride()
        )


@dataclass(frozen=True)
class HashRule:
    """How one lookup maps ids of its ``field`` to rows of its table.

    Ids in ``[head_start, head_stop)`` own the rows ``head_offset + (id - head_start)``;
    every other id hashes into the ``buckets`` rows starting at ``tail_offset``. A
    collisionless field is the head ``[0, n_f)`` (its tail then points at its own rows, so an
    out-of-range id still lands inside the table); a hashed field has an empty head; ``adapt``
    uses both parts (its head may start at 1 when the OOV id 0 is rare).
    """

    field: int
    head_start: int
    head_stop: int
    head_offset: int
    buckets: int
    tail_offset: int
    salt: int

    @classmethod
    def direct(cls, field: int, rows: int, offset: int, salt: int) -> HashRule:
        return cls(field, 0, rows, offset, rows, offset, salt)

    @classmethod
    def hashed(cls, field: int, buckets: int, offset: int, salt: int) -> HashRule:
        return cls(field, 0, 0, offset, buckets, offset, salt)

    @property
    def head_rows(self) -> int:
        return max(0, self.head_stop - self.head_start)


@register_index_map
class SaltedHashMap(FanOutMap):
    """Field ids -> rows by :class:`HashRule` (one per lookup), all lookups in one vectorised pass.

    The per-lookup integers live in :meth:`to_config` (JSON), so the map adds no tensor bytes
    to the artifact.
    """

    kind = "salted_hash"

    def __init__(
        self, features: Sequence[str], lookup_keys: Sequence[str], rules: Sequence[HashRule]
    ) -> None:
        super().__init__(features, lookup_keys, [r.field for r in rules])
        if any(r.buckets < 1 for r in rules):
            raise ValueError("every hashed lookup needs at least one bucket")
        self.rules = list(rules)
        self._any_head = any(r.head_rows for r in rules)

        def per_lookup(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64)

        self.register_buffer(
            "_head_start", per_lookup([r.head_start for r in rules]), persistent=False
        )
        self.register_buffer(
            "_head_stop", per_lookup([r.head_stop for r in rules]), persistent=False
        )
        self.register_buffer(
            "_head_shift",
            per_lookup([r.head_offset - r.head_start for r in rules]),
            persistent=False,
        )
        self.register_buffer("_buckets", per_lookup([r.buckets for r in rules]), persistent=False)
        self.register_buffer(
            "_tail_offset", per_lookup([r.tail_offset for r in rules]), persistent=False
        )
        self.register_buffer(
            "_mixed_salt", mix64(per_lookup([r.salt for r in rules])), persistent=False
        )

    def rows(
        self, values: torch.Tensor, per_value: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        # salted_hash(v, salt) = mix64(v ^ mix64(salt)) & INT63, with the salts mixed once.
        hashed = mix64(values ^ per_value(self._mixed_salt)) & INT63
        tail = torch.remainder(hashed, per_value(self._buckets)) + per_value(self._tail_offset)
        if not self._any_head:
            return tail
        in_head = (values >= per_value(self._head_start)) & (values < per_value(self._head_stop))
        return torch.where(in_head, values + per_value(self._head_shift), tail)

    def hashed_fields(self) -> list[str]:
        owned = {r.field for r in self.rules if r.head_rows}
        return [f for i, f in enumerate(self.features) if i not in owned]

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "rules": [asdict(r) for r in self.rules]}

    @classmethod
    def from_config(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SaltedHashMap:
        return cls(
            config["features"], config["lookup_keys"], [HashRule(**r) for r in config["rules"]]
        )


def proportional_rows(sizes: Sequence[int], capacity: int, minimum: int = 1) -> list[int]:
    """Rows ``M_f = clip(⌊r·n_f⌋, minimum, n_f)``, ``r`` the largest ratio fitting ``capacity``.

    Rows left over by the rounding go one each to the fields furthest below ``r·n_f``, so the
    total uses the capacity (up to ``Σ n_f``). Needs ``capacity >= minimum · len(sizes)``.
    """
    n = np.asarray(sizes, dtype=np.float64)
    if not len(n):
        return []
    if capacity >= n.sum():
        return [int(s) for s in sizes]
    if capacity < minimum * len(n):
        raise ValueError(f"{capacity} rows cannot give {len(n)} fields {minimum} row(s) each")

    def rows_at(r: float) -> np.ndarray:
        return np.clip(np.floor(r * n), minimum, n)

    lo, hi = 0.0, 1.0
    for _ in range(100):  # bisection on r: the total is non-decreasing in r
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rows_at(mid).sum() <= capacity else (lo, mid)
    rows = rows_at(lo)
    spare = int(capacity - rows.sum())
    below = np.flatnonzero(rows < n)
    order = below[np.argsort(-(lo * n[below] - rows[below]), kind="stable")]
    rows[order[:spare]] += 1
    return [int(r) for r in rows]


def keep_small_fields(
    sizes: Sequence[int],
    threshold: int,
    spare_rows: int,
    rows_each_other: int = 1,
    share: float = 1.0,
) -> list[bool]:
    """Which fields stay collisionless: those of at most ``threshold`` values, smallest first,
    kept greedily while their rows stay within ``share`` of ``spare_rows`` and leave
    ``rows_each_other`` rows for every field not kept (ties by field order)."""
    keep = [False] * len(sizes)
    kept, others = 0, len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (sizes[i], i)):
        n = sizes[i]
        if n > threshold:
            break
        if kept + n > share * spare_rows or kept + n + rows_each_other * (others - 1) > spare_rows:
            break
        keep[i] = True
        kept += n
        others -= 1
    return keep


def direct_layout(
    features: Sequence[FeatureSpec], dim: int, storage: str, seed: int
) -> TableLayout:
    """Every field collisionless in its own table (the budget holds the full tables)."""
    names = [f.name for f in features]
    return TableLayout(
        tables=[TableSpec(f"t_{f.name}", f.cardinality, dim, storage) for f in features],
        lookups=[Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)],
        index_map=SaltedHashMap(
            names,
            names,
            [
                HashRule.direct(i, f.cardinality, 0, stable_salt(f.name, 0, seed))
                for i, f in enumerate(features)
            ],
        ),
    )


def budget_error(method: str, needed: int, budget: int, full: int, why: str) -> BudgetError:
    return BudgetError(
        f"{method}: {why}: it needs at least {describe_bytes(needed)} but the budget is "
        f"{describe_bytes(budget)} ({full / budget:.1f}x of {describe_bytes(full)})"
    )


@register
class Hash(TableMethod):
    """The salted hashing trick; per-field tables or one multiplexed table (``shared``).

    ``threshold``: fields of at most that many values may stay collisionless; ``keep_share``:
    the most of the budget's rows they may take (greedily, smallest first)."""

    name = "hash"
    option_help = {
        "shared": "one table for all hashed fields (multiplexing), not one per field",
        "keep_share": "most of the rows small fields kept whole may take (greedy, smallest first)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        shared: bool = False,
        threshold: int = DEFAULT_THRESHOLD,
        keep_share: float = 0.5,
        seed: int = 0,
        storage: str = "fp32",
        init_scale: float = 0.01,
    ) -> None:
        if not 0.0 <= keep_share <= 1.0:
            raise ValueError(f"hash: keep_share must lie in [0, 1], got {keep_share}")
        self.shared = shared
        self.threshold = threshold
        self.keep_share = keep_share
        self.seed = seed
        super().__init__(features, dim, budget_bytes, storage=storage, init_scale=init_scale)

    def solve_layout(self) -> TableLayout:
        sizes = [f.cardinality for f in self.features]
        row = row_bytes(self.dim, self.storage)
        capacity = self.budget_bytes // row
        if capacity >= sum(sizes):
            self.rows_per_field = {f.name: f.cardinality for f in self.features}
            return direct_layout(self.features, self.dim, self.storage, self.seed)
        return (
            self._shared_layout(sizes, capacity)
            if self.shared
            else self._per_field_layout(sizes, capacity)
        )

    def _salt(self, name: str) -> int:
        return stable_salt(name, 0, self.seed)

    def _per_field_layout(self, sizes: list[int], capacity: int) -> TableLayout:
        if capacity < len(sizes):
            raise budget_error(
                self.name,
                len(sizes) * row_bytes(self.dim, self.storage),
                self.budget_bytes,
                self.full_bytes,
                "per-field hashing keeps at least one row per field "
                "(shared=True multiplexes all fields into one table)",
            )
        keep = keep_small_fields(sizes, self.threshold, capacity, share=self.keep_share)
        kept = sum(n for n, k in zip(sizes, keep, strict=True) if k)
        hashed = iter(
            proportional_rows(
                [n for n, k in zip(sizes, keep, strict=True) if not k], capacity - kept
            )
        )
        rows = [n if k else next(hashed) for n, k in zip(sizes, keep, strict=True)]
        names = self.feature_names
        rules = [
            HashRule.direct(i, n, 0, self._salt(name))
            if m == n
            else HashRule.hashed(i, m, 0, self._salt(name))
            for i, (name, n, m) in enumerate(zip(names, sizes, rows, strict=True))
        ]
        self.rows_per_field = dict(zip(names, rows, strict=True))
        return TableLayout(
            tables=[
                TableSpec(f"t_{n}", m, self.dim, self.storage)
                for n, m in zip(names, rows, strict=True)
            ],
            lookups=[Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)],
            index_map=SaltedHashMap(names, names, rules),
        )

    def _shared_layout(self, sizes: list[int], capacity: int) -> TableLayout:
        if capacity < 1:
            raise budget_error(
                self.name,
                row_bytes(self.dim, self.storage),
                self.budget_bytes,
                self.full_bytes,
                "one row is the smallest table",
            )
        # Small fields own a collisionless block at the top; all others hash into the rest
        # (at least one bucket).
        keep = keep_small_fields(
            sizes, self.threshold, capacity - 1, rows_each_other=0, share=self.keep_share
        )
        rules, offset = [], 0
        names = self.feature_names
        for i, (name, n, k) in enumerate(zip(names, sizes, keep, strict=True)):
            if k:
                rules.append(HashRule.direct(i, n, offset, self._salt(name)))
                offset += n
        buckets = capacity - offset
        rules += [
            HashRule.hashed(i, buckets, offset, self._salt(name))
            for i, (name, k) in enumerate(zip(names, keep, strict=True))
            if not k
        ]
        rules.sort(key=lambda r: r.field)
        self.rows_per_field = {
            n: (s if k else buckets) for n, s, k in zip(names, sizes, keep, strict=True)
        }
        return TableLayout(
            tables=[TableSpec("shared", capacity, self.dim, self.storage)],
            lookups=[Lookup(n, "shared", field=i) for i, n in enumerate(names)],
            index_map=SaltedHashMap(names, names, rules),
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "shared": self.shared,
            "threshold": self.threshold,
            "keep_share": self.keep_share,
            "seed": self.seed,
            "rows_per_field": self.rows_per_field,
        }
