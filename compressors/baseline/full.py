"""``full`` — the uncompressed baseline: every value owns a row.

Per-field tables by default; ``shared=True`` multiplexes all fields into one physical table
with per-field row offsets (still collisionless). ``storage`` serves the rows at fp16 or
row-wise int8/int4/int2 instead of fp32.

Example::

    layer = build_compressor("full", features, dim=16, budget="1x")
    layer = build_compressor("full", features, dim=16, budget="3x", storage="int8")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compressors.core.base import FeatureSpec
from compressors.core.layout import DirectMap, OffsetMap
from compressors.core.registry import register
from compressors.core.storage import Lookup, TableSpec
from compressors.core.tables import TableLayout, TableMethod


@register
class Full(TableMethod):
    name = "full"
    option_help = {
        "shared": "one multiplexed table with per-field row offsets (still collisionless)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        shared: bool = False,
        storage: str = "fp32",
        init_scale: float = 0.01,
    ) -> None:
        self.shared = shared
        super().__init__(features, dim, budget_bytes, storage=storage, init_scale=init_scale)

    def solve_layout(self) -> TableLayout:
        names = self.feature_names
        if self.shared:
            offsets, rows = [], 0
            for f in self.features:
                offsets.append(rows)
                rows += f.cardinality
            return TableLayout(
                tables=[TableSpec("shared", rows, self.dim, self.storage)],
                lookups=[Lookup(n, "shared", field=i) for i, n in enumerate(names)],
                index_map=OffsetMap(names, offsets),
            )
        return TableLayout(
            tables=[
                TableSpec(f"t_{f.name}", f.cardinality, self.dim, self.storage)
                for f in self.features
            ],
            lookups=[Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)],
            index_map=DirectMap(names),
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "shared": self.shared}
