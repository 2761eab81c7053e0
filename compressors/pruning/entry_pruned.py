"""The base of entry-sparse methods (PEP, DeepLight): an :class:`EntryTable` with a per-entry
mask, a budget turned into a number of non-zero entries, and the cheapest honest export.

**Budget.** The most non-zero entries ``K`` whose CSR export fits the budget
(``K·(value + column bytes) + Σ_f (n_f + 1)·4`` (+ 4 bytes a field for int8's scale),
:func:`max_csr_entries`). Every field then exports in the cheapest of its forms (dense rows,
kept rows + remap, CSR), each no larger than its CSR, so a table with at most ``K`` non-zeros
always fits.

**Storage.** ``fp32``, ``fp16`` and ``int8`` offer all three forms (int8 CSR: one fp32 scale
per field, see :mod:`compressors.pruning.bytes`; int8 rows: fbgemm's row-wise codes).
``int4`` and ``int2`` serve dense or kept rows only (fbgemm row-wise; CSR values that coarse
would need a scale per row to stay useful, and cost little less than int8's column byte
already does), so their bound is by rows: every non-zero may sit in a row of its own, and
every field may need its remap, ``K = (budget − Σ_f remap(n_f)) // row_bytes(D)`` — a far
smaller ``K`` than int8's. Row-wise int-N codes are asymmetric (min/max), so a kept row's
pruned entries read back close to, not exactly, zero. ``set_storage`` (``ctr export
--storage``) serves the trained mask at another dtype, each field in its cheapest form there.

Example::

    class MyPruning(EntryPruned):
        name = "mine"
        def values(self, rows, weight): return weight * self.mask[rows]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from compressors.core.base import (
    Compressor,
    ExportedEmbedding,
    FeatureSpec,
    MemoryReport,
    SearchedBytes,
    full_bytes,
)
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.storage import check_dtype, optimizer_state_bytes, row_bytes
from compressors.pruning.bytes import (
    CSR_DTYPES,
    FieldPlan,
    cheapest_entry_plan,
    csr_fixed_bytes,
    index_bytes,
    max_csr_entries,
)
from compressors.pruning.entry_table import EntryTable, row_optimizer
from compressors.pruning.serving import export_pruned

if TYPE_CHECKING:
    pass

_CHUNK_ROWS = 1 << 18
_SELECT_ROWS = 1 << 16  # rows a selection pass reads at once (1M entries at dim 16)
log = logging.getLogger(__name__)


def _ordered(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 keys ordered as the floats (``-0.0`` as ``0.0``): a negative float's
    bits have their order reversed by flipping all but the sign bit."""
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@torch.no_grad()
def top_entries(
    score: Callable[[int, int], torch.Tensor],
    rows: int,
    k: int,
    out: torch.Tensor,
    chunk_rows: int | None = None,
) -> None:
    """``out`` (bool ``[rows, D]``) = the ``k`` entries of largest score (ties by position);
    ``score(start, stop)`` gives rows ``[start, stop)`` of the float scores.

    An exact radix select over chunks of rows (the scores' order-preserving 32-bit keys,
    16 bits a pass: two histograms, then one pass writing ``out``) instead of ``torch.topk``
    over the flattened table, whose CPU kernel copies every entry with its index beside the
    input: the working set stays a few chunks, whatever the table."""
    out.zero_()
    if k <= 0:
        return
    step = chunk_rows or _SELECT_ROWS
    chunks = [(a, min(a + step, rows)) for a in range(0, rows, step)]
    high = torch.zeros(1 << 16, dtype=torch.int64, device=out.device)
    for a, b in chunks:  # the keys' top 16 bits, shifted to [0, 2**16)
        high += torch.bincount(
            ((_ordered(score(a, b)) >> 16) + (1 << 15)).flatten(), minlength=1 << 16
        )
    top, need = _kth_bucket(high, k)
    top -= 1 << 15
    low = torch.zeros(1 << 16, dtype=torch.int64, device=out.device)
    for a, b in chunks:  # the low 16 bits of the keys in that bucket
        key = _ordered(score(a, b)).flatten()
        low += torch.bincount(key[(key >> 16) == top] & 0xFFFF, minlength=1 << 16)
    bottom, need = _kth_bucket(low, need)
    threshold = (top << 16) | bottom  # the k-th largest key; ``need`` of its ties to take
    for a, b in chunks:
        key = _ordered(score(a, b))
        keep = key > threshold
        if need > 0:
            tied = torch.nonzero((key == threshold).flatten()).flatten()[:need]
            need -= len(tied)
            keep.view(-1)[tied] = True
        out[a:b] = keep


def _kth_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the ``k``-th largest of the counted keys, and how many of its
    keys are among the ``k`` largest."""
    above = torch.cumsum(hist.flip(0), 0).flip(0) - hist  # keys in higher buckets
    bucket = int(torch.nonzero(above < k).min())
    return bucket, k - int(above[bucket])


def entry_floor_bytes(features: Sequence[FeatureSpec], dim: int, dtype: str) -> int:
    """What an entry-sparse export needs before its first entry: CSR row pointers (and int8
    scales), or for row-only dtypes every field's remap."""
    if dtype in CSR_DTYPES:
        return sum(csr_fixed_bytes(f.cardinality, dim, dtype) for f in features)
    return sum(index_bytes(f.cardinality, f.cardinality) for f in features)


def max_entries(features: Sequence[FeatureSpec], dim: int, budget: int, dtype: str) -> int:
    """The most non-zero entries any pattern of which fits ``budget`` at ``dtype`` (module
    docstring)."""
    if dtype in CSR_DTYPES:
        return max_csr_entries(features, dim, budget, dtype)
    return (budget - entry_floor_bytes(features, dim, dtype)) // row_bytes(dim, dtype)


class EntryPruned(SearchedBytes, Compressor):
    """Entry masks over one fp32 table; subclasses define :meth:`values` and the stages."""

    data_parallel = True  # replicated state stays identical across ranks (base class)

    option_help = {
        "optimizer": "optimizer of the table rows: sgd, adagrad, rowwise_adagrad or adam "
        "(None: the run's --table-optimizer, as every method's tables)",
        "storage": "serving dtype of the kept entries (fp32, fp16, int8: CSR or kept rows; "
        "int4, int2: kept rows)",
    }

    # What the budget buys follows the export format (a smaller pointer form buys entries).
    format_details = ("floor_bytes", "target_entries", "target_sparsity")

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        storage: str = "fp32",
        optimizer: str | None = None,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        self.storage = storage
        plan = self.solve_budget(features, dim, budget_bytes, storage=storage, optimizer=optimizer)
        if not plan["feasible"]:
            floor = plan["floor_bytes"]
            what = "the CSR row pointers" if storage in CSR_DTYPES else "the id remaps"
            raise BudgetError(
                f"{self.name}: {what} alone need {describe_bytes(floor)} at {storage}"
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
        check_dtype(storage, dim)
        rows = sum(f.cardinality for f in features)
        entries = rows * dim
        target = min(entries, max_entries(features, dim, budget_bytes, storage))
        train = (
            entries * 4
            + optimizer_state_bytes(rows, dim, row_optimizer(options))
            + entries  # the bool mask
        )
        return {
            "method": cls.name,
            "feasible": target > 0,
            "target_entries": max(target, 0),
            "target_sparsity": 1.0 - max(target, 0) / entries,
            "serve_bytes_max": budget_bytes,
            "floor_bytes": entry_floor_bytes(features, dim, storage),
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

    @torch.no_grad()
    def all_values(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Values of table rows ``[start, stop)`` as the model reads them."""
        stop = self.table.rows if stop is None else stop
        self.table.flush_decay()
        rows = torch.arange(start, stop, device=self.table.weight.device)
        return self.values(rows, self.table.weight[start:stop])

    @torch.no_grad()
    def mask_nonzero_values(self) -> None:
        """The mask = the entries the model reads as non-zero, chunk by chunk."""
        for s in range(0, self.table.rows, _CHUNK_ROWS):
            stop = min(s + _CHUNK_ROWS, self.table.rows)
            self.mask[s:stop] = self.all_values(s, stop) != 0

    @torch.no_grad()
    def nonzeros(self) -> int:
        return sum(
            int((self.all_values(s, min(s + _CHUNK_ROWS, self.table.rows)) != 0).sum())
            for s in range(0, self.table.rows, _CHUNK_ROWS)
        )

    @torch.no_grad()
    def keep_top(
        self,
        scores: torch.Tensor | Callable[[int, int], torch.Tensor],
        k: int,
        revive: bool = False,
    ) -> None:
        """Sets the mask to the ``k`` entries of largest ``scores`` (``[N, D]``, or a function
        of ``(start, stop)`` giving rows ``[start, stop)`` of them, so no table-sized copy need
        exist; ties by position). Without ``revive`` an entry already masked stays masked;
        with it every entry competes (a pruned entry that regrew can come back)."""
        score = scores if callable(scores) else lambda a, b: scores[a:b]
        if revive:
            k = min(k, self.mask.numel())
            eligible = score
        else:
            k = min(k, int(self.mask.sum()))

            def eligible(a: int, b: int) -> torch.Tensor:
                return score(a, b).masked_fill(~self.mask[a:b], float("-inf"))

        chosen = torch.empty_like(self.mask)  # eligible() reads the mask while selecting
        top_entries(eligible, self.table.rows, k, chosen)
        self.mask.copy_(chosen)

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

    def plan_context(self) -> dict[str, Any]:
        return {"table_optimizer": self.table_optimizer}

    def set_storage(self, dtype: str) -> None:
        """Serves the trained entries at ``dtype``, each field in its cheapest form there. The
        mask is the one trained for the run's storage: at a dtype without CSR (int4, int2)
        the bytes can exceed the run's budget, which a warning then says."""
        check_dtype(dtype, self.dim)
        self.storage = dtype
        serve = self.memory().serve_bytes
        if serve > self.budget_bytes:
            log.warning(
                "%s: at %s the trained mask needs %s, over the run's budget %s (it was "
                "pruned for %s storage)",
                self.name,
                dtype,
                describe_bytes(serve),
                describe_bytes(self.budget_bytes),
                self.options.get("storage", "fp32"),
            )

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
