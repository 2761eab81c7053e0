"""``alpt`` — Adaptive Low-Precision Training (Li et al., AAAI 2023, arXiv 2212.05735).

Embeddings are integer codes during training and serving; each row ``v`` has a learnable
step size ``Δ_v`` (``e_v = Δ_v · q_v``, ``q_v ∈ [−2^(b−1), 2^(b−1) − 1]``). Every training
step alternates, as the paper's Algorithm 1 (and Hetu's reference trainer) do:

1. *weights, step fixed*: forward/backward with ``ŵ = Δ·q``; the batch's unique rows are
   updated in fp32 (sparse row-wise Adagrad by default) to ``ŵ'``;
2. *step, weights fixed*: the same batch is run again through the model with the LSQ
   quantiser ``Q(ŵ'; Δ) = Δ · round(clip(ŵ'/Δ))`` (straight-through round, so
   ``∂Q/∂Δ = round(v) − v`` inside the range and the clip bound outside); the gradient of the
   loss w.r.t. ``Δ`` of those rows updates ``Δ`` (Adagrad, one float of state per row,
   learning rate ``step_lr`` in units of the initial step, so one setting suits every bit
   width);
3. ``q = clip(SR(ŵ'/Δ'))`` with stochastic rounding writes the rows back as integers.

So training holds ``b``-bit codes (an int8 buffer for b ≤ 8), one fp32 step and the optimizer
states per row: 28 bytes a row at D=16 against fp32's 68 (``memory().train_bytes``).

The budget solves ``b``: the most precise of 8, 4, 2 bits whose fbgemm rows (``D·b/8 + 4``
bytes: fp16 scale + bias) fit; int2 at D=16 reaches 8x, beyond that a BudgetError.
Export maps the codes exactly onto fbgemm's int-N rows: ``code = q + 2^(b−1)``,
``scale = Δ``, ``bias = −2^(b−1)·Δ``. The forward always uses ``Δ`` rounded to fp16 (the
master copy stays fp32, gradients pass straight through), so the exported rows hold exactly
the values the trained model uses.

Deviations: the paper's step-size optimizer is the model's (Adam in its experiments); we
use Adagrad to keep one float of state per row instead of two. Adagrad normalises the
gradient, so LSQ's constant gradient scale ``1/sqrt(B·D·Q_p)`` (Hetu multiplies by it)
would cancel and is left out. Steps are per row (the
paper's main setting), not per field. ``Δ`` starts at LSQ's ``2·E|w|/sqrt(Q_p)`` for the
uniform initialisation. Steps are clamped to at least 2^-24 (fp16's smallest subnormal).

Example::

    layer = build_compressor("alpt", features, dim=16, budget="3x")        # 8-bit
    layer = build_compressor("alpt", features, dim=16, budget="6x")        # solves 2-bit
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from compressors.core.base import FeatureSpec, full_bytes
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.registry import register
from compressors.core.storage import row_bytes
from compressors.precision.common import fbgemm_rows
from compressors.precision.integer import IntegerEmbedding

if TYPE_CHECKING:
    from compressors.core.base import StageContext

AUTO = "auto"
BIT_CHOICES = (8, 4, 2)
_MIN_STEP = 2.0**-24


def fp16_rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 in the forward pass, identity in the backward pass."""
    return x + (x.half().float() - x).detach()


def lsq_quantize(values: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``step · round(clip(values / step))`` with LSQ's straight-through gradient for ``step``."""
    v = (values / step.unsqueeze(1)).clamp(lo, hi)
    return (v + (torch.round(v) - v).detach()) * step.unsqueeze(1)


@register
class ALPT(IntegerEmbedding):
    """Integer tables with learnable per-row step sizes (see module docstring)."""

    name = "alpt"
    option_help = {
        "bits": "integer bits (auto: the fewest that fit)",
        "step_lr": "learning rate of the per-row step sizes",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        bits: int | str = AUTO,
        optimizer: str = "rowwise_adagrad",
        step_lr: float = 1.0,
        init_scale: float = 0.01,
    ) -> None:
        self.step_lr = step_lr
        rows = sum(f.cardinality for f in features)
        super().__init__(
            features,
            dim,
            budget_bytes,
            self._solve_bits(bits, rows, dim, budget_bytes, full_bytes(features, dim)),
            optimizer,
            init_scale,
        )

    @staticmethod
    def _solve_bits(bits: int | str, rows: int, dim: int, budget: int, full: int) -> int:
        valid = [b for b in BIT_CHOICES if (dim * b) % 8 == 0]
        if bits != AUTO:
            if bits not in valid:
                raise ValueError(f"alpt: bits must be 'auto' or one of {valid} at dim {dim}")
            return int(bits)
        fitting = [b for b in valid if rows * row_bytes(dim, f"int{b}") <= budget]
        if not fitting:
            floor = rows * row_bytes(dim, f"int{valid[-1]}")
            raise BudgetError(
                f"alpt: the budget {describe_bytes(budget)} ({full / budget:.1f}x) is out of "
                "reach: "
                f"{valid[-1]}-bit rows (dim·bits/8 + 4 bytes) need {describe_bytes(floor)}, "
                f"at most {full / floor:.1f}x; use binary or an inter-feature method beyond"
            )
        return fitting[0]

    @property
    def storage_name(self) -> str:
        return f"int{self.bits}"

    def serve_bytes(self) -> int:
        rows = sum(f.cardinality for f in self.features)
        return rows * row_bytes(self.dim, f"int{self.bits}")

    def init_steps(self, init_scale: float) -> None:
        _, hi = self.code_range
        # LSQ's initial step 2·E|w|/sqrt(Q_p), with E|w| = init_scale / 2 for the uniform init.
        self.initial_step = init_scale / math.sqrt(hi)
        self.register_buffer("step", torch.full((self.rows,), self.initial_step))
        self.register_buffer("step_state", torch.zeros(self.rows))

    def row_steps(self, rows: torch.Tensor) -> torch.Tensor:
        return fp16_rounded(self.step[rows])

    def steps_train_bytes(self) -> int:
        return (self.step.numel() + self.step_state.numel()) * 4

    def update_steps(self, rows: torch.Tensor, updated: torch.Tensor, ctx: StageContext) -> None:
        batch = ctx.batch
        lo, hi = self.code_range
        step = self.step[rows].clone().requires_grad_()
        with self.replaced_rows(rows, lsq_quantize(updated, step, lo, hi)):
            loss = ctx.loss(batch)
        (grad,) = torch.autograd.grad(loss, [step])
        with torch.no_grad():
            acc = self.step_state[rows] + grad.pow(2)
            self.step_state[rows] = acc
            lr = self.step_lr * self.initial_step
            new = step - lr * grad / (acc.sqrt() + 1e-12)
            self.step[rows] = new.clamp_(min=_MIN_STEP)

    def export_table(self) -> tuple[str, torch.Tensor]:
        return f"int{self.bits}", fbgemm_rows(self.codes, self.step.half().float(), self.bits)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "step_lr": self.step_lr,
            "mean_step": float(self.step.mean()),
        }
