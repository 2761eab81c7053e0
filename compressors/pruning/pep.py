"""``pep`` — Plug-in Embedding Pruning (Liu et al., ICLR 2021, "Learnable Embedding Sizes
for Recommender Systems"; reference code ``ssui-liu/learnable-embed-sizes-for-RecSys``).

Every entry is reparameterised with a learnable soft threshold,
``ŵ = sign(w) · relu(|w| − g(s))`` with ``g = sigmoid``; ``s`` is one scalar per field
(``granularity="field"``) or per field and dim (``"field_dim"``), initialised to
``threshold_init`` and trained with Adam at ``threshold_lr`` jointly with the table and the
network. As in the reference, the only other force on ``s`` is Adam's L2 weight decay
(``threshold_decay``, the reference's ``1e-5``): while ``g'(s)`` is tiny the decay dominates
and Adam's normalised steps walk ``s`` up towards 0, until the data loss pushes back. Two
stages:

1. **search** (training): every ``check_every`` steps the table's sparsity is measured; the
   first time it reaches the budget's sparsity (see :mod:`compressors.pruning.entry`) the
   mask ``|w| > g(s)`` is frozen, as the paper saves the pruned structure once the target
   is met. The rest of the stage trains with the frozen mask (its weights are discarded by
   the rewind). If the target is never reached, the stage ends by keeping the largest
   ``|ŵ|`` entries up to the target, with a warning.
2. **retrain** (training) from the run's initial weights with the mask fixed
   (lottery-ticket rewind, the paper's setting; ``rewind=False`` keeps the searched weights).

Deviations: the reference trains embeddings with Adam (L2 ``1e-5``); here the table uses the sparse
row-wise Adagrad every table method uses (fbgemm's fused kernels cannot reparameterise
entries, so the table is a plain buffer and training is single-process). The reference
initialises ``s`` at −150 (Criteo, ``feature_dim``) over runs of many epochs; the default
``threshold_init=-6`` lets shorter runs prune (``threshold_init=-150`` is one option away).
Runs too short for the thresholds to reach the budget's sparsity end with the magnitude
fallback above (logged).

Example::

    layer = build_compressor("pep", features, dim=16, budget="5x")
    layer = build_compressor("pep", features, dim=16, budget="5x", granularity="field_dim")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressors.core.base import FeatureSpec, Stage
from compressors.core.registry import register
from compressors.pruning.entry import EntryPruned

if TYPE_CHECKING:
    from compressors.core.base import StageContext

log = logging.getLogger(__name__)
GRANULARITIES = ("field", "field_dim")


def soft_threshold(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(w) · relu(|w| − threshold)`` (PEP's reparameterisation)."""
    return torch.sign(weight) * torch.relu(weight.abs() - threshold)


@register
class PEP(EntryPruned):
    """Learnable soft thresholds, then a lottery-ticket retrain (module docstring)."""

    name = "pep"
    option_help = {
        "storage": "serving dtype of the kept entries (fp32 or fp16: CSR or kept rows)",
        "granularity": "one threshold per field ('field') or per field and dim ('field_dim')",
        "threshold_init": "initial threshold logit s, g(s)=sigmoid(s) (reference -150)",
        "threshold_lr": "Adam learning rate of the thresholds",
        "threshold_decay": "L2 decay on the thresholds (the reference's 1e-5)",
        "check_every": "steps between checks of the budget's sparsity",
        "rewind": "retrain from the initial weights with the found mask (lottery ticket)",
        "search_epochs": "epochs of the threshold-learning stage (None: the run's)",
        "retrain_epochs": "epochs of the retrain stage (None: the run's)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        storage: str = "fp32",
        granularity: str = "field",
        threshold_init: float = -6.0,
        threshold_lr: float = 0.01,
        threshold_decay: float = 1e-5,
        check_every: int = 10,
        rewind: bool = True,
        search_epochs: float | None = None,
        retrain_epochs: float | None = None,
        optimizer: str = "rowwise_adagrad",
        init_scale: float = 0.01,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"pep: granularity must be one of {GRANULARITIES}, got {granularity!r}"
            )
        if check_every < 1:
            raise ValueError(f"pep: check_every must be >= 1, got {check_every}")
        super().__init__(features, dim, budget_bytes, storage, optimizer, init_scale)
        self.granularity = granularity
        self.threshold_lr = threshold_lr
        self.threshold_decay = threshold_decay
        self.check_every = check_every
        width = 1 if granularity == "field" else dim
        self.threshold = nn.Parameter(torch.full((len(features), width), float(threshold_init)))
        self.register_buffer("found", torch.zeros((), dtype=torch.bool))
        self.register_buffer("found_step", torch.full((), -1, dtype=torch.int64))
        self.stages = (
            Stage("search", epochs=search_epochs),
            Stage("retrain", epochs=retrain_epochs, rewind=rewind),
        )

    def values(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if bool(self.found):
            return weight * self.mask[rows].to(weight.dtype)
        g = torch.sigmoid(self.threshold)[self.table.field_of(rows)]
        return soft_threshold(weight, g)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        return [
            {
                "params": [self.threshold],
                "optimizer": "adam",
                "lr": self.threshold_lr,
                "weight_decay": self.threshold_decay,
            }
        ]

    def rewind_keep(self) -> list[str]:
        return ["mask", "found", "found_step", "threshold"]

    def extra_train_bytes(self) -> int:
        return self.threshold.numel() * 4 * 3  # the value and Adam's two moments

    @classmethod
    def solve_budget(
        cls, features: Sequence[FeatureSpec], dim: int, budget_bytes: int, **options: Any
    ) -> dict[str, Any]:
        plan = super().solve_budget(features, dim, budget_bytes, **options)
        width = 1 if options.get("granularity", "field") == "field" else dim
        plan["train_bytes"] += len(features) * width * 4 * 3  # thresholds and Adam's moments
        return plan

    def after_step(self, ctx: StageContext) -> None:
        super().after_step(ctx)
        if ctx.stage.name == "search" and not bool(self.found) and ctx.step % self.check_every == 0:
            if self.nonzeros() <= self.target_entries:
                self._freeze(ctx.step)

    @torch.no_grad()
    def _freeze(self, step: int) -> None:
        self.mask.copy_(self.all_values() != 0)
        self.found.fill_(True)
        self.found_step.fill_(step)
        log.info("pep: target sparsity reached at step %d; mask frozen", step)

    @torch.no_grad()
    def on_stage_end(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name != "search" or bool(self.found):
            return
        soft = self.all_values()
        self.mask.copy_(soft != 0)
        log.warning(
            "pep: the thresholds reached sparsity %.3f, not the budget's %.3f; keeping the "
            "largest |ŵ| entries up to the target",
            1 - int(self.mask.sum()) / self.mask.numel(),
            1 - self.target_entries / self.mask.numel(),
        )
        self.keep_top(soft.abs(), self.target_entries)
        self.found.fill_(True)
        self.found_step.fill_(ctx.step)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "granularity": self.granularity,
            "found_step": int(self.found_step),
        }
