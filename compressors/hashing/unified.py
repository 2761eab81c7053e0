"""``unified`` — Unified Embedding (Coleman et al., NeurIPS 2023): feature multiplexing.

See :mod:`compressors.hashing.hash` for the family's shared index maps and solvers and the
module docstring there for the method's description and deviations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compressors.core.base import FeatureSpec
from compressors.core.hash64 import stable_salt
from compressors.core.registry import register
from compressors.core.storage import Lookup, TableSpec, check_dtype, row_bytes
from compressors.core.tables import TableLayout, TableMethod
from compressors.hashing.hash import (
    HashRule,
    SaltedHashMap,
    budget_error,
    direct_layout,
)


@register
class Unified(TableMethod):
    """Unified Embedding: all fields multiplexed into shared tables, ``k_f`` salted probes each.

    ``chunks`` is the probe count of every field (``dim`` must be divisible by it);
    ``field_chunks`` overrides it per field name. ``num_tables`` splits each shared table
    into that many sub-tables of equal rows.

    ``threshold`` (default 0, the paper's setting: every feature is multiplexed) keeps the
    fields of at most that many values out of the shared table, in collisionless rows of
    their own, when the budget holds them (``threshold=200`` is DLRM's ``--qr-threshold``
    convention, which on the default data keeps 18 of 26 fields out, so only 8 would be
    multiplexed). The other methods of the family keep their thresholds; comparisons at
    equal bytes should pass the same ``threshold`` to both sides.
    """

    name = "unified"
    option_help = {
        "chunks": "probes per field; each reads dim/chunks columns",
        "field_chunks": "per-field probe counts overriding chunks",
        "num_tables": "sub-tables the shared buckets are split over",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        chunks: int = 2,
        field_chunks: Mapping[str, int] | None = None,
        num_tables: int = 1,
        threshold: int = 0,
        seed: int = 0,
        storage: str = "fp32",
        init_scale: float = 0.01,
    ) -> None:
        field_chunks = dict(field_chunks or {})
        unknown = sorted(set(field_chunks) - {f.name for f in features})
        if unknown:
            raise ValueError(f"unified: field_chunks names unknown fields {unknown}")
        self.chunks_per_field = {f.name: int(field_chunks.get(f.name, chunks)) for f in features}
        for name, k in self.chunks_per_field.items():
            if k < 1 or dim % k:
                raise ValueError(
                    f"unified: field {name!r} has {k} chunks, which must be positive and divide "
                    f"dim={dim} (each chunk is dim/chunks columns)"
                )
            check_dtype(storage, dim // k)
        if num_tables < 1:
            raise ValueError(f"unified: num_tables must be positive, got {num_tables}")
        self.num_tables = num_tables
        self.threshold = threshold
        self.seed = seed
        super().__init__(features, dim, budget_bytes, storage=storage, init_scale=init_scale)

    def solve_layout(self) -> TableLayout:
        sizes = [f.cardinality for f in self.features]
        full_row = row_bytes(self.dim, self.storage)
        if sum(sizes) * full_row <= self.budget_bytes:
            self.kept = self.feature_names
            layout = direct_layout(self.features, self.dim, self.storage, self.seed)
            self.table_rows = {t.name: t.rows for t in layout.tables}
            return layout
        width = [self.dim // self.chunks_per_field[f.name] for f in self.features]

        def smallest_shared(hashed: list[int]) -> int:
            return sum(
                self.num_tables * row_bytes(d, self.storage) for d in {width[i] for i in hashed}
            )

        keep = [n <= self.threshold for n in sizes]
        kept_bytes = sum(n for n, k in zip(sizes, keep, strict=True) if k) * full_row
        hashed = [i for i, k in enumerate(keep) if not k]
        if kept_bytes + smallest_shared(hashed) > self.budget_bytes:
            keep, kept_bytes, hashed = [False] * len(sizes), 0, list(range(len(sizes)))
        if smallest_shared(hashed) > self.budget_bytes:
            raise budget_error(
                self.name,
                smallest_shared(hashed),
                self.budget_bytes,
                self.full_bytes,
                f"{self.num_tables} sub-table(s) of one row",
            )
        names = self.feature_names
        self.kept = [n for n, k in zip(names, keep, strict=True) if k]
        tables: list[TableSpec] = []
        offset = 0
        direct_rules: dict[int, HashRule] = {}
        for i in (i for i, k in enumerate(keep) if k):
            salt = stable_salt(names[i], 0, self.seed)
            direct_rules[i] = HashRule.direct(i, sizes[i], offset, salt)
            offset += sizes[i]
        if offset:
            tables.append(TableSpec("direct", offset, self.dim, self.storage))
        # Each chunk width gets one shared table (split into sub-tables), bytes by vocabulary.
        spare = self.budget_bytes - kept_bytes
        vocab = {
            d: sum(sizes[i] for i in hashed if width[i] == d)
            for d in sorted({width[i] for i in hashed}, reverse=True)
        }
        sub_tables: dict[int, list[tuple[str, int]]] = {}
        for d, v in vocab.items():
            rows = spare * v // sum(vocab.values()) // row_bytes(d, self.storage)
            if rows < self.num_tables:
                raise budget_error(
                    self.name,
                    smallest_shared(hashed),
                    self.budget_bytes,
                    self.full_bytes,
                    f"the {d}-column chunks get {rows} rows for {self.num_tables} sub-table(s)",
                )
            sub_tables[d] = [
                (f"unified_d{d}_{j}", rows // self.num_tables + (j < rows % self.num_tables))
                for j in range(self.num_tables)
            ]
            tables += [TableSpec(t, r, d, self.storage) for t, r in sub_tables[d]]
        # Lookups in field order, chunks in column order, so the pooled columns already are the
        # [F, dim] output (no reordering); (field, chunk) probes are dealt to sub-tables
        # round-robin, as the reference does.
        lookups: list[Lookup] = []
        rules: list[HashRule] = []
        turn = dict.fromkeys(vocab, 0)
        for i, name in enumerate(names):
            if i in direct_rules:
                lookups.append(Lookup(name, "direct", field=i))
                rules.append(direct_rules[i])
                continue
            d = width[i]
            for c in range(self.dim // d):
                table, rows = sub_tables[d][turn[d] % self.num_tables]
                turn[d] += 1
                lookups.append(Lookup(f"{name}_c{c}", table, field=i, start=c * d))
                rules.append(HashRule.hashed(i, rows, 0, stable_salt(name, c, self.seed)))
        self.table_rows = {t.name: t.rows for t in tables}
        return TableLayout(
            tables=tables,
            lookups=lookups,
            index_map=SaltedHashMap(names, [lk.key for lk in lookups], rules),
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "chunks_per_field": self.chunks_per_field,
            "num_tables": self.num_tables,
            "threshold": self.threshold,
            "seed": self.seed,
            "kept_fields": self.kept,
            "table_rows": self.table_rows,
        }
