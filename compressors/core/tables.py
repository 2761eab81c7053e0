"""Table-based methods: index map -> physical tables -> combiner (docs/design.md's decomposition).

``TableMethod`` is the base of every method whose storage is tables (full, hash, unified,
qr, adapt, ptq, ...). A subclass only solves its layout from the budget — which tables,
which lookups, which index map — and inherits training on TorchRec/fbgemm tables, exact
memory accounting, export, and serving through fbgemm's int-N kernel (:class:`TableServing`).
Because the serving dtype is just a field of ``TableSpec``, any layout can be stored at
fp16/int8/int4/int2 (e.g. hashed rows in int4) without new code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import (
    Compressor,
    ExportedEmbedding,
    FeatureSpec,
    MemoryReport,
    Plan,
    is_planning,
    planning,
)
from compressors.core.layout import INDEX_MAPS, Combiner, IndexMap
from compressors.core.storage import (
    Lookup,
    ServeTables,
    TableSpec,
    TrainTables,
    check_dtype,
    layout_from_config,
    pack_rows,
)

TABLE_KIND = "tables"


@dataclass
class TableLayout:
    """What a table method's budget solver decides."""

    tables: list[TableSpec]
    lookups: list[Lookup]
    index_map: IndexMap
    op: str = "sum"

    def serve_bytes(self) -> int:
        return sum(t.serve_bytes for t in self.tables) + sum(
            v.numel() * v.element_size() for v in self.index_map.tensors().values()
        )

    def to_json(self) -> dict[str, Any]:
        """The layout as a plan records it (and as the export config lists it)."""
        return {
            "op": self.op,
            "index_map": self.index_map.to_config(),
            "tables": [t.to_json() for t in self.tables],
            "lookups": [lk.to_json() for lk in self.lookups],
        }


class TableMethod(Compressor):
    """Base of the table-based methods; subclasses implement :meth:`solve_layout`.

    ``storage`` is the serving dtype of every table (``fp32``, ``fp16``, ``int8``, ``int4``,
    ``int2``); the budget is checked at that dtype. ``init_scale`` bounds the uniform init.
    """

    name: ClassVar[str] = ""
    option_help: ClassVar[dict[str, str]] = {
        "storage": "serving dtype of the tables: fp32, fp16, int8, int4 or int2 (fbgemm rows)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        storage: str = "fp32",
        init_scale: float = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        check_dtype(storage, dim)
        self.storage = storage
        layout = self.solve_layout()
        self.check_budget(layout.serve_bytes(), f"the solved layout at {storage}")
        self.index_map = layout.index_map
        # While solving, the tables are shapes without storage (see ``planning``).
        with torch.device("meta") if is_planning() else contextlib.nullcontext():
            self.tables = TrainTables(layout.tables, layout.lookups, init_scale=init_scale)
        dims = {t.name: t.dim for t in layout.tables}
        self.combiner = Combiner(
            layout.lookups,
            [dims[lk.table] for lk in layout.lookups],
            len(features),
            dim,
            layout.op,
        )
        self.layout = layout

    def solve_layout(self) -> TableLayout:
        """Chooses tables, lookups and index map so the serving bytes fit the budget."""
        raise NotImplementedError

    @classmethod
    def solve(
        cls,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        options: dict[str, Any],
    ) -> Plan:
        """The layout is the plan: :meth:`solve_layout` in plain Python (its index map holds
        a few per-lookup integers), the tables only as shapes."""
        with planning():
            method = cls(features, dim, budget_bytes, **options)
        method.options = dict(options)
        return method.plan()

    def plan_details(self) -> dict[str, Any]:
        return {"layout": self.layout.to_json()}

    def set_storage(self, dtype: str) -> None:
        """Serves every table at ``dtype`` with the same rows (the training tables are fp32
        whatever the storage, so the trained weights stay valid)."""
        for t in self.layout.tables:
            check_dtype(dtype, t.dim)
        self.layout.tables = [replace(t, dtype=dtype) for t in self.layout.tables]
        self.storage = dtype

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.combiner(self.tables(self.index_map(features)))

    def memory(self) -> MemoryReport:
        parts = {f"table.{t.name}": t.serve_bytes for t in self.layout.tables}
        parts.update(
            {
                f"index_map.{k}": v.numel() * v.element_size()
                for k, v in self.index_map.tensors().items()
            }
        )
        train = sum(t.train_bytes(self.table_optimizer) for t in self.layout.tables)
        return MemoryReport(
            serve_bytes=sum(parts.values()),
            train_bytes=train,
            full_bytes=self.full_bytes,
            parts=parts,
        )

    def export(self) -> ExportedEmbedding:
        weights = self.tables.weights()
        tensors = {
            f"table.{t.name}": pack_rows(weights[t.name], t.dtype) for t in self.layout.tables
        }
        tensors.update({f"index_map.{k}": v for k, v in self.index_map.tensors().items()})
        return ExportedEmbedding(
            kind=TABLE_KIND,
            config={
                "method": self.name,
                "dim": self.dim,
                "num_fields": self.num_features,
                **self.layout.to_json(),
            },
            tensors=tensors,
        )

    def hashed_fields(self) -> list[str]:
        return self.index_map.hashed_fields()

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "tables": len(self.layout.tables),
            "rows": sum(t.rows for t in self.layout.tables),
            "lookups": len(self.layout.lookups),
        }


class TableServing(nn.Module):
    """Serving side of every table method: the same index map and combiner, int-N storage."""

    def __init__(self, exported: ExportedEmbedding) -> None:
        super().__init__()
        cfg = exported.config
        tables, lookups = layout_from_config(cfg)
        map_cfg = cfg["index_map"]
        if map_cfg["kind"] not in INDEX_MAPS:
            raise ValueError(f"unknown index map {map_cfg['kind']!r}")
        prefix = "index_map."
        self.index_map = INDEX_MAPS[map_cfg["kind"]].from_config(
            map_cfg,
            {k[len(prefix) :]: v for k, v in exported.tensors.items() if k.startswith(prefix)},
        )
        self.index_map.check_tables({t.name: t.rows for t in tables}, lookups)
        self.tables = ServeTables(
            tables, lookups, {t.name: exported.tensors[f"table.{t.name}"] for t in tables}
        )
        dims = {t.name: t.dim for t in tables}
        self.dim = int(cfg["dim"])
        self.combiner = Combiner(
            lookups, [dims[lk.table] for lk in lookups], cfg["num_fields"], cfg["dim"], cfg["op"]
        )

    def check_fields(self, cardinalities: dict[str, int], dim: int) -> None:
        """Refuses a config built for another dim or (where the index map states them)
        other fields than the model's."""
        if self.dim != dim:
            raise ValueError(f"tables: config dim {self.dim}, the embedding's is {dim}")
        self.index_map.check_fields(cardinalities)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.combiner(self.tables(self.index_map(features)))
