"""``alpt`` — Adaptive Low-Precision Training (Li et al., AAAI 2023, arXiv 2212.05735).

Embeddings are ``b``-bit integer codes during training and serving; each row has a learnable
step size ``Δ_v`` (``e_v = Δ_v · q_v``). Every training step alternates, as the paper's
Algorithm 1: the batch's rows are updated in fp32 with the step fixed; the same batch is run
again through the LSQ quantiser to update ``Δ`` with the weights fixed; the rows are written
back as integers by stochastic rounding. Training holds the codes, one fp32 step and the
optimizer state per row. How it works in detail, and the measured figures:
``docs/methods/alpt.md``.

Options: ``bits`` (``auto``: solved from the budget), ``optimizer`` (the rows'), ``step_optimizer``
(``adagrad`` | ``adam``), ``step_lr``, ``init_scale`` (``option_help`` says each).

Deviations from the paper:

* The default step optimizer is a tuned row-wise Adagrad (``step_lr`` in units of the initial
  step, one float of state a row); the paper's Adam with LSQ's gradient scale is
  ``step_optimizer="adam"``.
* Steps are per row (the paper's main setting), not per field; ``Δ`` starts at LSQ's
  ``2·E|w|/sqrt(Q_p)`` and is clamped to at least 2^-24.

Example::

    layer = build_compressor("alpt", features, dim=16, budget="3x")        # 8-bit
    layer = build_compressor("alpt", features, dim=16, budget="6x")        # solves 2-bit
    layer = build_compressor("alpt", features, dim=16, budget="6x", step_optimizer="adam")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from compressors.core.base import FeatureSpec, full_bytes
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.collective import world_size
from compressors.core.registry import register
from compressors.core.storage import row_bytes
from compressors.precision.common import fbgemm_rows
from compressors.precision.integer import IntegerEmbedding

if TYPE_CHECKING:
    from compressors.core.base import Stage, StageContext

AUTO = "auto"
BIT_CHOICES = (8, 4, 2)
STEP_OPTIMIZERS = ("adagrad", "adam")
DEFAULT_STEP_LR = {"adagrad": 1.0, "adam": 2e-5}
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
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
    """Integer tables with learnable per-row step sizes (see module docstring). Options:
    ``bits`` ("auto" or 8/4/2), ``optimizer`` (the weights' sparse optimizer),
    ``step_optimizer`` ("adagrad": tuned variant, default; "adam": the reference), ``step_lr``
    (None: 1.0 initial steps for adagrad, 2e-5 for adam; 0 keeps the steps fixed)."""

    name = "alpt"
    option_help = {
        "bits": "integer bits (auto: the fewest that fit)",
        "step_lr": "learning rate of the steps (None: 1.0 initial steps / adam 2e-5; 0: fixed)",
        "step_optimizer": "adagrad (tuned variant, default) or adam (the reference's)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        bits: int | str = AUTO,
        optimizer: str = "rowwise_adagrad",
        step_optimizer: str = "adagrad",
        step_lr: float | None = None,
        init_scale: float = 0.01,
    ) -> None:
        if step_optimizer not in STEP_OPTIMIZERS:
            raise ValueError(
                f"alpt: step_optimizer must be one of {STEP_OPTIMIZERS}, got {step_optimizer!r}"
            )
        self.step_optimizer = step_optimizer
        self.step_lr = DEFAULT_STEP_LR[step_optimizer] if step_lr is None else step_lr
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
        # adagrad: [rows] sum of squares; adam: [rows, 3] = (m, v, update count).
        shape = (self.rows,) if self.step_optimizer == "adagrad" else (self.rows, 3)
        self.register_buffer("step_state", torch.zeros(shape))

    def row_steps(self, rows: torch.Tensor) -> torch.Tensor:
        return fp16_rounded(self.step[rows])

    def steps_train_bytes(self) -> int:
        return (self.step.numel() + self.step_state.numel()) * 4

    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        if world_size() > 1:
            raise RuntimeError(
                f"{self.name}: learns each row's step from a second pass over the batch with "
                "its rows replaced, which needs the whole global batch on one rank; train it "
                "without torchrun"
            )

    def update_steps(self, rows: torch.Tensor, updated: torch.Tensor, ctx: StageContext) -> None:
        if self.step_lr == 0:
            return  # fixed steps (the ablation of the learned step)
        batch = ctx.batch
        lo, hi = self.code_range
        step = self.step[rows].clone().requires_grad_()
        with self.replaced_rows(rows, lsq_quantize(updated, step, lo, hi)):
            loss = ctx.loss(batch)
        (grad,) = torch.autograd.grad(loss, [step])
        with torch.no_grad():
            if self.step_optimizer == "adagrad":
                acc = self.step_state[rows] + grad.pow(2)
                self.step_state[rows] = acc
                lr = self.step_lr * self.initial_step
                new = step - lr * grad / (acc.sqrt() + 1e-12)
            else:
                # LSQ's gradient scale 1/sqrt(N·Q_p), then Adam per row with bias correction.
                grad = grad / math.sqrt(updated.numel() * hi)
                state = self.step_state[rows]
                (b1, b2), count = _ADAM_BETAS, state[:, 2] + 1
                m = b1 * state[:, 0] + (1 - b1) * grad
                v = b2 * state[:, 1] + (1 - b2) * grad.pow(2)
                self.step_state[rows] = torch.stack([m, v, count], 1)
                m_hat, v_hat = m / (1 - b1**count), v / (1 - b2**count)
                new = step - self.step_lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)
            self.step[rows] = new.clamp_(min=_MIN_STEP)

    def export_table(self) -> tuple[str, torch.Tensor]:
        return f"int{self.bits}", fbgemm_rows(self.codes, self.step.half().float(), self.bits)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "step_optimizer": self.step_optimizer,
            "step_lr": self.step_lr,
            "mean_step": float(self.step.mean()),
        }
