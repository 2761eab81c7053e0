"""``deeplight`` — gradual magnitude pruning of the embedding entries (Deng et al., WSDM 2021,
"DeepLight: Deep Lightweight Feature Interactions for Accelerating CTR Predictions").

Two stages:

1. **prune** (training): every ``prune_every`` steps the smallest-magnitude live entries
   are masked so the table's sparsity follows DeepLight's schedule
   ``s_t = S · (1 − 0.99^(t / decay_steps))`` (``t``: steps into the stage, ``S``: the
   budget's sparsity, see :mod:`compressors.pruning.entry`); masked entries read zero and
   get no gradient, and a pruned entry never returns. At the end of the stage the sparsity
   is brought exactly to ``S``.
2. **finetune** (training) with the mask fixed.

The paper's ``decay_steps=100`` reaches 99% of ``S`` after ~46,000 steps; ``decay_steps``
scales that to shorter runs (the default 100 is the paper's). DeepLight also prunes the DNN
and the field-pair weights; only the embedding tables are pruned here, as this layer owns
only them. Tables train with the sparse row-wise Adagrad every table here uses (a plain
buffer, so single-process training).

Example::

    layer = build_compressor("deeplight", features, dim=16, budget="5x")
    layer = build_compressor("deeplight", features, dim=16, budget="5x", decay_steps=5)
    layer = build_compressor("deeplight", features, dim=16, budget="10x", storage="int8")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from compressors.core.base import SCHEDULED, FeatureSpec, Stage
from compressors.core.registry import register
from compressors.pruning.entry import EntryPruned

if TYPE_CHECKING:
    from compressors.core.base import StageContext

log = logging.getLogger(__name__)


def deeplight_sparsity(target: float, step: int, decay_steps: float) -> float:
    """DeepLight's schedule: ``target · (1 − 0.99^(step / decay_steps))``."""
    return target * (1.0 - 0.99 ** (step / decay_steps))


@register
class DeepLight(EntryPruned):
    """Gradual magnitude pruning, then fine-tuning (module docstring)."""

    name = "deeplight"
    default_optimizer = "adam"  # the paper's; its criteria need it (docs/methods)
    option_help = {
        "optimizer": "optimizer of the table rows: sgd, adagrad, rowwise_adagrad or adam "
        "(None: the run's --table-optimizer, as every method's tables)",
        "storage": "serving dtype of the kept entries (fp32, fp16, int8: CSR or kept rows; "
        "int4, int2: kept rows)",
        "decay_steps": "steps of the schedule S·(1 − 0.99^(t/decay_steps)) (paper: 100)",
        "prune_every": "steps between magnitude-pruning passes",
        "prune_epochs": "epochs of the gradual-pruning stage (None: the run's)",
        "finetune_epochs": "epochs of the fine-tuning stage (None: the run's)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        storage: str = "fp32",
        decay_steps: float = 100.0,
        prune_every: int = 10,
        prune_epochs: float | None = None,
        finetune_epochs: float | None = None,
        optimizer: str | None = None,
        init_scale: float = 0.01,
    ) -> None:
        if decay_steps <= 0 or prune_every < 1:
            raise ValueError("deeplight: decay_steps must be positive and prune_every >= 1")
        super().__init__(features, dim, budget_bytes, storage, optimizer, init_scale)
        self.decay_steps = decay_steps
        self.prune_every = prune_every
        self.register_buffer("stage_start", torch.full((), -1, dtype=torch.int64))
        self.stages = (
            Stage("prune", epochs=prune_epochs, **SCHEDULED),
            Stage("finetune", epochs=finetune_epochs),
        )

    def architecture_state(self) -> list[str]:
        return ["mask", "stage_start"]

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.target_entries / self.mask.numel()

    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        super().on_stage_start(stage, ctx)
        if stage.name == "prune" and not ctx.resumed:
            self.stage_start.fill_(ctx.step)

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        keep = round((1.0 - sparsity) * self.mask.numel())
        if keep < int(self.mask.sum()):
            self.table.flush_decay()
            self.keep_top(self.table.weight.abs(), max(keep, self.target_entries))

    def after_step(self, ctx: StageContext) -> None:
        super().after_step(ctx)
        t = ctx.step - int(self.stage_start)
        if ctx.stage.name == "prune" and t % self.prune_every == 0:
            self.prune_to(deeplight_sparsity(self.target_sparsity, t, self.decay_steps))

    def on_stage_end(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name == "prune":
            self.prune_to(self.target_sparsity)
            log.info("deeplight: pruned to sparsity %.4f", self.target_sparsity)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "decay_steps": self.decay_steps}
