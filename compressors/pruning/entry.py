"""The base of entry-sparse methods (PEP, DeepLight): an :class:`EntryTable` with a per-entry
mask, a budget turned into a number of non-zero entries, and the cheapest honest export.

**Budget.** The most non-zero entries ``K`` whose CSR export fits the budget
(``K·(value + column bytes) + Σ_f (n_f + 1)·4``, :func:`max_csr_entries`). Every field then
exports in the cheapest of its forms (dense rows, kept rows + remap, CSR), each no larger than
its CSR, so a table with at most ``K`` non-zeros always fits. Storage is ``fp32`` or ``fp16``
(CSR values at that precision); row-wise int-N storage of sparse rows is not offered.

Example::

    class MyPruning(EntryPruned):
        name = "mine"
        def values(self, rows, weight): return weight * self.mask[rows]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from compressors.core.base import (
    Compressor,
    ExportedEmbedding,
    FeatureSpec,
    MemoryReport,
    SearchedBytes,
    Stage,
    full_bytes,
)
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.storage import optimizer_state_bytes
from compressors.pruning.common import (
    CSR_DTYPES,
    PTR_BYTES,
    EntryTable,
    FieldPlan,
    cheapest_entry_plan,
    export_pruned,
    max_csr_entries,
    refuse_distributed,
)

if TYPE_CHECKING:
    from compressors.core.base import StageContext

_CHUNK_ROWS = 1 << 18


class EntryPruned(SearchedBytes, Compressor):
    """Entry masks over one fp32 table; subclasses define :meth:`values` and the stages."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        storage: str = "fp32",
        optimizer: str = "rowwise_adagrad",
        init_scale: float = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        self.storage = storage
        plan = self.solve_budget(features, dim, budget_bytes, storage=storage, optimizer=optimizer)
        if not plan["feasible"]:
            floor = plan["floor_bytes"]
            raise BudgetError(
                f"{self.name}: the CSR row pointers alone need {describe_bytes(floor)}"
                f" ({self.full_bytes / plan['floor_bytes']:.1f}x) but the budget is "
                f"{describe_bytes(budget_bytes)} ({self.full_bytes / budget_bytes:.1f}x); "
                "entry pruning cannot reach it (try optembed or an inter-feature method)"
            )
        self.target_entries = plan["target_entries"]
        self.table = EntryTable(features, dim, optimizer, init_scale)
        self.register_buffer("mask", torch.ones(self.table.rows, dim, dtype=torch.bool))

    @classmethod
    def solve_budget(
        cls, features: Sequence[FeatureSpec], dim: int, budget_bytes: int, **options: Any
    ) -> dict[str, Any]:
        """The plan by arithmetic: at most ``target_entries`` non-zeros (the sparsity the run
        prunes to); serve bytes at most the budget, exact ones depend on the learned pattern."""
        storage = options.get("storage", "fp32")
        if storage not in CSR_DTYPES:
            raise ValueError(
                f"{cls.name}: storage must be one of {list(CSR_DTYPES)} (sparse rows are served "
                f"as CSR or kept rows), got {storage!r}"
            )
        rows = sum(f.cardinality for f in features)
        entries = rows * dim
        target = min(entries, max_csr_entries(features, dim, budget_bytes, storage))
        train = (
            entries * 4
            + optimizer_state_bytes(rows, dim, options.get("optimizer", "rowwise_adagrad"))
            + entries  # the bool mask
        )
        return {
            "method": cls.name,
            "feasible": target > 0,
            "target_entries": max(target, 0),
            "target_sparsity": 1.0 - max(target, 0) / entries,
            "serve_bytes_max": budget_bytes,
            "floor_bytes": sum((f.cardinality + 1) * PTR_BYTES for f in features),
            "train_bytes": train,
            "full_bytes": full_bytes(features, dim),
        }

    # ---------------------------------------------------------------- subclass interface
    def values(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The values the model reads for ``rows`` (``weight`` is their raw leaf)."""
        return weight * self.mask[rows].to(weight.dtype)

    # ---------------------------------------------------------------- training
    def forward(self, features):  # type: ignore[no-untyped-def]
        return self.table(features, self.values)

    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        refuse_distributed(self.name)

    def after_step(self, ctx: StageContext) -> None:
        self.table.step(ctx.table_lr)

    @torch.no_grad()
    def all_values(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Values of table rows ``[start, stop)`` as the model reads them."""
        stop = self.table.rows if stop is None else stop
        rows = torch.arange(start, stop)
        return self.values(rows, self.table.weight[start:stop])

    @torch.no_grad()
    def nonzeros(self) -> int:
        return sum(
            int((self.all_values(s, min(s + _CHUNK_ROWS, self.table.rows)) != 0).sum())
            for s in range(0, self.table.rows, _CHUNK_ROWS)
        )

    @torch.no_grad()
    def keep_top(self, scores: torch.Tensor, k: int) -> None:
        """Sets the mask to the ``k`` entries of largest ``scores`` (``[N, D]``; ties by
        position), never reviving an entry already masked."""
        flat = torch.where(self.mask, scores, torch.full_like(scores, -1.0)).flatten()
        k = min(k, int(self.mask.sum()))
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.topk(flat, k, sorted=False).indices] = True
        self.mask.copy_(mask.view_as(self.mask))

    # ---------------------------------------------------------------- memory and export
    @torch.no_grad()
    def plans(self) -> list[FieldPlan]:
        plans = []
        for f, spec in enumerate(self.features):
            sl = self.table.field_slice(f)
            nz = self.all_values(sl.start, sl.stop) != 0
            plans.append(
                cheapest_entry_plan(
                    spec.name,
                    spec.cardinality,
                    int(nz.any(1).sum()),
                    int(nz.sum()),
                    self.dim,
                    self.storage,
                )
            )
        return plans

    def memory(self) -> MemoryReport:
        plans = self.plans()
        parts = {f"field.{p.name}.{p.form}": p.serve_bytes(self.storage) for p in plans}
        return MemoryReport(
            serve_bytes=sum(parts.values()),
            train_bytes=self.table.train_bytes() + self.mask.numel() + self.extra_train_bytes(),
            full_bytes=self.full_bytes,
            parts=parts,
        )

    def extra_train_bytes(self) -> int:
        return 0

    @torch.no_grad()
    def export(self) -> ExportedEmbedding:
        def values(f: int) -> torch.Tensor:
            sl = self.table.field_slice(f)
            return self.all_values(sl.start, sl.stop)

        return export_pruned(
            self.name,
            self.dim,
            self.plans(),
            self.storage,
            values,
            lambda f: values(f).ne(0).any(1),
        )

    def hyperparameters(self) -> dict[str, Any]:
        entries = self.table.rows * self.dim
        return {
            "storage": self.storage,
            "target_entries": self.target_entries,
            "target_sparsity": 1.0 - self.target_entries / entries,
            "sparsity": 1.0 - self.nonzeros() / entries,
            "forms": {p.name: p.form for p in self.plans()},
        }
