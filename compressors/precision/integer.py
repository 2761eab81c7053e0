"""``int8`` / ``int16`` — training with integer tables (the benchmark's INT8/16 training).

The tables *are* integers while training: codes ``q`` (an int8 or int16 buffer, no fp32
copy) times one fixed step ``s`` per table. A batch reads its unique rows, dequantises them
to a small fp32 leaf tensor and pools it, so backward yields exact row gradients. After the
optimizer step (the ``after_step`` hook) those rows are updated in fp32 by a sparse optimizer
and written back as ``q = clip(SR(w / s))`` with *stochastic rounding*, which keeps updates
smaller than one step alive in expectation (Gupta et al. 2015; the Hetu benchmark's
INT8/16). The optimizer is the ``optimizer`` option (SGD, row-wise Adagrad or Adagrad, at the
trainer's ``table_lr``; the trainer's ``table_optimizer`` drives fbgemm tables only); its
state counts in ``train_bytes``.

``s`` is the power of two nearest ``max_abs / 2^(bits-1)`` (``max_abs`` bounds the values a
row can hold). A power of two makes int8 export *exact*: fbgemm's INT8 row stores
``code = q + 128``, ``scale = s``, ``bias = −128·s``, all exact in fp16. fbgemm has no int16
serving type, so ``int16`` exports fp16 values ``fp16(q·s)`` — relative error at most
2^-11 (≈ 4.9e-4) per value, same 2 bytes a value as int16, served by the same kernel.

Limitations (by design): these tables cannot use fbgemm's fused fp32 training kernels, so a
step is slower than ``full``'s; and they are buffers, not TorchRec tables, so DMP would
replicate rather than shard them: under torchrun every rank holds the whole code table and
applies the global batch's update (the ranks' row gradients averaged). Precision saves the same
fraction of every row, so no field is left uncompressed for being small.

Example::

    layer = build_compressor("int8", features, dim=16, budget="3x")
    layer = build_compressor("int16", features, dim=16, budget="2x", optimizer="sgd")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from compressors.core.base import Compressor, ExportedEmbedding, FeatureSpec, MemoryReport
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.collective import average_rows
from compressors.core.layout import OffsetMap
from compressors.core.optim import SparseRowOptimizer  # noqa: F401 (re-exported)
from compressors.core.registry import register
from compressors.core.storage import Lookup, TableSpec, row_bytes
from compressors.core.tables import TABLE_KIND
from compressors.precision.common import (
    PACK_CHUNK_ROWS,
    fbgemm_rows,
    signed_range,
    stochastic_round,
)

if TYPE_CHECKING:
    from compressors.core.base import StageContext

TABLE = "shared"
_INIT_CHUNK_ROWS = 1 << 20


@dataclass
class _Pending:
    """The rows the last training forward read, as the fp32 leaf autograd fills."""

    rows: torch.Tensor
    weight: torch.Tensor


class IntegerEmbedding(Compressor):
    """Base of methods whose tables are integer codes during training (int8/int16, ALPT).

    All fields share one code table (field ``f`` owns rows ``[offset_f, offset_f + n_f)``),
    so a batch is one unique + one ``embedding_bag``. Subclasses define the step of each row
    (:meth:`row_steps`), may learn it (:meth:`update_steps`), and choose the export.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        bits: int,
        optimizer: str = "rowwise_adagrad",
        init_scale: float = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        self.bits = bits
        self.optimizer = optimizer
        need = self.serve_bytes()
        if need > budget_bytes:
            raise BudgetError(
                f"{self.name}: {self.storage_name} rows need {describe_bytes(need)} (at most "
                f"{self.full_bytes / need:.2f}x) but the budget is {describe_bytes(budget_bytes)} "
                f"({self.full_bytes / budget_bytes:.1f}x); for more, use ptq or alpt at 4/2 bits, "
                "binary, or an inter-feature method (hash, qr, tt, ...)"
            )
        offsets, rows = [], 0
        for f in self.features:
            offsets.append(rows)
            rows += f.cardinality
        self.rows = rows
        self.index_map = OffsetMap(self.feature_names, offsets)
        self.register_buffer(
            "codes", torch.zeros(rows, dim, dtype=torch.int8 if bits <= 8 else torch.int16)
        )
        self.weight_optimizer = SparseRowOptimizer(optimizer, rows, dim)
        self.init_steps(init_scale)
        self._init_codes(init_scale)
        self._pending: _Pending | None = None
        self._replacement: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---------------------------------------------------------------- subclass interface
    @property
    def storage_name(self) -> str:
        """The served row format, for messages."""
        raise NotImplementedError

    def serve_bytes(self) -> int:
        """Bytes of the exported table at this method's precision."""
        raise NotImplementedError

    def init_steps(self, init_scale: float) -> None:
        """Registers the step buffers (called before the codes are initialised)."""
        raise NotImplementedError

    def row_steps(self, rows: torch.Tensor) -> torch.Tensor:
        """The dequantisation step of each of ``rows`` (fp32, ``[len(rows)]``)."""
        raise NotImplementedError

    def update_steps(self, rows: torch.Tensor, updated: torch.Tensor, ctx: StageContext) -> None:
        """Learns the steps of ``rows`` given their updated fp32 values (default: fixed)."""

    def steps_train_bytes(self) -> int:
        """Training bytes of the steps and their optimizer state."""
        raise NotImplementedError

    # ---------------------------------------------------------------- codes
    @property
    def code_range(self) -> tuple[int, int]:
        return signed_range(self.bits)

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        return self.codes[rows].float() * self.row_steps(rows).unsqueeze(1)

    def store(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Writes fp32 ``values`` of ``rows`` back as codes, stochastically rounded."""
        lo, hi = self.code_range
        q = stochastic_round(values / self.row_steps(rows).unsqueeze(1)).clamp_(lo, hi)
        self.codes[rows] = q.to(self.codes.dtype)

    @torch.no_grad()
    def _init_codes(self, init_scale: float) -> None:
        for start in range(0, self.rows, _INIT_CHUNK_ROWS):
            rows = torch.arange(start, min(start + _INIT_CHUNK_ROWS, self.rows))
            self.store(rows, torch.empty(len(rows), self.dim).uniform_(-init_scale, init_scale))

    # ---------------------------------------------------------------- training
    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        mapped = self.index_map(features)
        rows, inverse = torch.unique(mapped.values(), return_inverse=True)
        if self._replacement is not None:
            replaced_rows, weight = self._replacement
            if not torch.equal(replaced_rows, rows):
                raise RuntimeError("replacement rows differ from the batch's rows")
        else:
            weight = self.dequantize(rows)
            if self.training and torch.is_grad_enabled():
                weight.requires_grad_()
                self._pending = _Pending(rows, weight)
        pooled = F.embedding_bag(
            inverse, weight, mapped.offsets(), mode="sum", include_last_offset=True
        )
        return pooled.view(self.num_features, -1, self.dim).transpose(0, 1)

    @contextlib.contextmanager
    def replaced_rows(self, rows: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
        """Within the block, forward reads ``values`` for ``rows`` (a batch's unique rows)."""
        self._replacement = (rows, values)
        try:
            yield
        finally:
            self._replacement = None

    @torch.no_grad()
    def after_step(self, ctx: StageContext) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending.weight.grad is None:
            return
        # Under torchrun: every rank's rows, the global batch's gradients (the table is
        # replicated, so every rank then makes the same update).
        rows, grad = average_rows(pending.rows, pending.weight.grad)
        values = (
            pending.weight.detach() if len(rows) == len(pending.rows) else self.dequantize(rows)
        )
        updated = self.weight_optimizer.step(rows, values, grad, ctx.table_lr)
        with torch.enable_grad():
            self.update_steps(rows, updated, ctx)
        self.store(rows, updated)

    # ---------------------------------------------------------------- accounting and export
    def memory(self) -> MemoryReport:
        codes = self.codes.numel() * self.codes.element_size()
        return MemoryReport(
            serve_bytes=self.serve_bytes(),
            train_bytes=codes + self.weight_optimizer.nbytes + self.steps_train_bytes(),
            full_bytes=self.full_bytes,
            parts={f"table.{TABLE}": self.serve_bytes()},
        )

    def export_table(self) -> tuple[str, torch.Tensor]:
        """The served dtype and the table's packed rows."""
        raise NotImplementedError

    def export(self) -> ExportedEmbedding:
        dtype, packed = self.export_table()
        return ExportedEmbedding(
            kind=TABLE_KIND,
            config={
                "method": self.name,
                "dim": self.dim,
                "num_fields": self.num_features,
                "op": "sum",
                "index_map": self.index_map.to_config(),
                "tables": [TableSpec(TABLE, self.rows, self.dim, dtype).to_json()],
                "lookups": [
                    Lookup(n, TABLE, field=i).to_json() for i, n in enumerate(self.feature_names)
                ],
            },
            tensors={f"table.{TABLE}": packed},
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {"bits": self.bits, "optimizer": self.optimizer, "rows": self.rows}


class FixedStepTraining(IntegerEmbedding):
    """int8/int16 training with one fixed power-of-two step (see module docstring)."""

    data_parallel = True  # replicated codes, the ranks' row gradients averaged

    BITS: ClassVar[int] = 8
    option_help = {
        "max_abs": "largest representable magnitude (sets the fixed step)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        max_abs: float = 1.0,
        optimizer: str = "rowwise_adagrad",
        init_scale: float = 0.01,
    ) -> None:
        if not max_abs > 0:
            raise ValueError(f"max_abs must be positive, got {max_abs}")
        self.max_abs = max_abs
        super().__init__(features, dim, budget_bytes, self.BITS, optimizer, init_scale)

    def serve_bytes(self) -> int:
        rows = sum(f.cardinality for f in self.features)
        return rows * row_bytes(self.dim, self.serve_dtype)

    @property
    def serve_dtype(self) -> str:
        return "int8" if self.BITS == 8 else "fp16"

    @property
    def storage_name(self) -> str:
        return f"{self.serve_dtype}"

    def init_steps(self, init_scale: float) -> None:
        exponent = round(math.log2(self.max_abs / (1 << (self.bits - 1))))
        self.register_buffer("step", torch.tensor(2.0**exponent))

    def row_steps(self, rows: torch.Tensor) -> torch.Tensor:
        return self.step.expand(len(rows))

    def steps_train_bytes(self) -> int:
        return self.step.element_size()

    def export_table(self) -> tuple[str, torch.Tensor]:
        if self.bits == 8:
            return "int8", fbgemm_rows(self.codes, self.step.expand(self.rows), 8)
        out = torch.empty(self.codes.shape, dtype=torch.float16)
        for start in range(0, len(out), PACK_CHUNK_ROWS):  # no whole-table fp32 temporary
            rows = slice(start, start + PACK_CHUNK_ROWS)
            out[rows] = self.codes[rows] * self.step
        return "fp16", out

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "step": float(self.step), "max_abs": self.max_abs}


@register
class Int8Training(FixedStepTraining):
    name = "int8"
    BITS = 8


@register
class Int16Training(FixedStepTraining):
    name = "int16"
    BITS = 16
