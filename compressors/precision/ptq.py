"""``ptq`` — post-training quantisation of per-field tables, optionally mixed precision.

Trains ``full``'s collisionless per-field fp32 tables on TorchRec/fbgemm, then quantises each
table row-wise to fp16, int8, int4 or int2 in fbgemm's inference format (an fp16 scale and
bias lead every int-N row) and serves them with fbgemm's ``IntNBitTableBatchedEmbeddingBags``.

``bits="auto"`` (default) is mixed precision per field: after training, the ``quantize``
stage measures every field's frequency-weighted reconstruction error
``Σ_v freq_v · ||e_v − Q(e_v)||²`` at each dtype on the trained weights and picks the dtypes
that minimise the total under the budget (a multiple-choice knapsack, see
:func:`compressors.precision.common.choose_dtypes`). Until then ``memory()`` reports the plan: the
most precise uniform dtype that fits. A fixed ``bits`` quantises every field alike.

Fields of at most ``min_rows`` values stay fp32 (like DLRM's ``--qr-threshold``): they cost
little and their few rows are read by every sample. Precision alone cannot go far: int2 at
dim D costs ``D/4 + 4`` bytes a row against ``4·D``, so at most 8x at D=16 (12.8x at D=64);
budgets beyond raise a :class:`~compressors.core.budget.BudgetError` before training.

The stages leave the trained table holding exactly the values its artifact serves (the
weights are rounded through fbgemm's own pack/unpack), so exported predictions equal the
trained model's up to float summation order. The chosen dtypes live in a buffer of the
state dict, so ``load_run_model`` + export reproduce them.

Options: ``bits`` (``auto`` | fp16 | int8 | int4 | int2), ``min_rows``, ``init_scale``
(``option_help`` says each).

Deviations (no single paper): the mixed-precision choice is a frequency-weighted error
knapsack on the trained weights; fields of at most ``min_rows`` values stay fp32.

Example::

    layer = build_compressor("ptq", features, dim=16, budget="4x")          # mixed
    layer = build_compressor("ptq", features, dim=16, budget="3x", bits="int8")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressors.baseline.full import Full
from compressors.core.base import FeatureSpec, Stage
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.registry import register
from compressors.core.tables import TableLayout
from compressors.precision.common import (
    DTYPES,
    apply_table_dtypes,
    solve_mixed_precision,
    valid_dtypes,
)

if TYPE_CHECKING:
    from compressors.core.base import StageContext

AUTO = "auto"


@register
class PTQ(Full):
    """Per-field tables trained in fp32 and served quantised (see module docstring)."""

    name = "ptq"
    option_help = {
        "bits": "auto (mixed precision per field) or one of fp16, int8, int4, int2",
        "min_rows": "fields of at most this many rows stay fp32",
    }
    stages = (Stage("train"), Stage("quantize", trains=False))

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        bits: str = AUTO,
        min_rows: int = 64,
        init_scale: float = 0.01,
    ) -> None:
        if bits != AUTO and bits not in DTYPES[1:]:
            raise ValueError(f"ptq: bits must be 'auto' or one of {DTYPES[1:]}, got {bits!r}")
        self.bits = bits
        self.min_rows = min_rows
        super().__init__(features, dim, budget_bytes, shared=False, init_scale=init_scale)
        # The chosen dtypes (indices into DTYPES) and whether the weights were rounded to them:
        # buffers, so checkpoints and model.pt carry them.
        self.register_buffer("dtype_index", self._dtype_index(), persistent=True)
        self.register_buffer("quantized", torch.tensor(False))
        self.register_load_state_dict_post_hook(PTQ._restore_dtypes)

    def solve_layout(self) -> TableLayout:
        layout = super().solve_layout()
        pinned = [t.rows <= self.min_rows for t in layout.tables]
        options = valid_dtypes(self.dim, DTYPES[1:] if self.bits == AUTO else [self.bits])
        if not options:
            raise ValueError(
                f"ptq: {self.bits} rows need dim * bits divisible by 8 (dim={self.dim})"
            )

        def uniform(dtype: str) -> list[str]:
            return ["fp32" if pin else dtype for pin in pinned]

        def cost(dtypes: list[str]) -> int:
            return sum(
                replace(t, dtype=d).serve_bytes for t, d in zip(layout.tables, dtypes, strict=True)
            )

        fitting = [d for d in options if cost(uniform(d)) <= self.budget_bytes]
        if not fitting:
            floor = cost(uniform(valid_dtypes(self.dim)[-1]))
            kept = f", fields of <= {self.min_rows} rows kept fp32" if any(pinned) else ""
            at = (
                ""
                if self.bits == AUTO
                else (f"bits={self.bits} needs {describe_bytes(cost(uniform(options[-1])))}; ")
            )
            raise BudgetError(
                f"ptq: {at}the budget {describe_bytes(self.budget_bytes)} "
                f"({self.full_bytes / self.budget_bytes:.1f}x) is out of reach of precision alone, "
                f"which gets at most {self.full_bytes / floor:.1f}x here (int2 rows of "
                f"dim/4 + 4 bytes{kept}); inter-feature methods (hash, qr, tt, ...) go beyond"
            )
        layout.tables = [
            replace(t, dtype=d) for t, d in zip(layout.tables, uniform(fitting[0]), strict=True)
        ]
        self._pinned = pinned
        return layout

    def run_stage(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name != "quantize":
            return super().run_stage(stage, ctx)
        if self.bits == AUTO:
            candidates = [["fp32"] if pin else list(DTYPES) for pin in self._pinned]
            dtypes = solve_mixed_precision(self, self.budget_bytes, candidates)
        else:
            dtypes = [t.dtype for t in self.layout.tables]
        apply_table_dtypes(self, dtypes)
        self.dtype_index.copy_(self._dtype_index())
        self.quantized.fill_(True)

    def _dtype_index(self) -> torch.Tensor:
        return torch.tensor([DTYPES.index(t.dtype) for t in self.layout.tables], dtype=torch.int8)

    @staticmethod
    def _restore_dtypes(module: nn.Module, incompatible: Any) -> None:
        # The loaded weights already hold the quantised values; only the dtypes follow.
        assert isinstance(module, PTQ)
        apply_table_dtypes(
            module, [DTYPES[i] for i in module.dtype_index.tolist()], round_weights=False
        )

    def hyperparameters(self) -> dict[str, Any]:
        common = {
            k: v for k, v in super().hyperparameters().items() if k not in ("storage", "shared")
        }
        return {
            **common,
            "bits": self.bits,
            "min_rows": self.min_rows,
            "quantized": bool(self.quantized),
            "dtypes": {
                f.name: t.dtype for f, t in zip(self.features, self.layout.tables, strict=True)
            },
        }
