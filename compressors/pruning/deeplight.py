"""``deeplight`` — gradual magnitude pruning of the embedding entries (Deng et al., WSDM 2021,
"DeepLight: Deep Lightweight Feature Interactions for Accelerating CTR Predictions";
reference code also in Hetu's ``tools/EmbeddingMemoryCompression``).

Two stages:

1. **prune** (training): a dense warm-up, then every ``prune_every`` steps the
   smallest-magnitude entries are pruned so the table's sparsity follows DeepLight's curve,
   until it reaches the budget's sparsity ``S`` (see :mod:`compressors.pruning.entry_pruned`) and
   holds it. At the end of the stage the sparsity is exactly ``S``.
2. **finetune** (training) with the mask fixed.

**Schedule.** The paper's ``s_t = S · (1 − 0.99^(t / 100))`` is an exponential approach to
``S`` that reaches 99% of it after ~46,000 steps, a fixed number of steps. ``schedule="stage"``
(default) keeps the curve's shape and fits it to the stage: nothing is pruned during the first
``warmup`` share of the stage (dense warm-up), then ``s = S · (1 − 0.01^x) / 0.99`` with
``x`` going from 0 to 1 between ``warmup`` and ``target_at`` (the same curve, rescaled in time
so that its 99% point lands at ``target_at``), and ``S`` until the stage ends.
``schedule="paper"`` is the paper's curve over the stage's steps, from its first step
(``decay_steps``, the paper's 100): on a run of a few hundred steps it reaches a few
percent of ``S`` and the stage's end prunes the rest at once, which is why it is not the
default.

**Regrowth.** ``regrow=True`` (default, both references' way) zeroes the pruned entries and
lets them learn on: every pass ranks all entries by magnitude, so an entry pruned early can
come back if its gradient grows it past the survivors. ``regrow=False`` masks them for good
(an entry pruned once never returns; masked entries get no gradient). From the stage's end on
the mask is fixed either way.

Options: ``schedule`` (``stage``/``paper``), ``warmup`` and ``target_at`` (shares of the prune
stage, ``stage`` schedule), ``decay_steps`` (``paper`` schedule), ``prune_every``, ``regrow``,
``storage``, ``prune_epochs``, ``finetune_epochs`` (0: no fine-tuning stage), ``optimizer``.

Deviations from the paper:

- The default schedule is defined over the stage (above); ``schedule="paper"`` is the
  paper's.
- Only the embedding tables are pruned (DeepLight also prunes the DNN and the field-pair
  weights): this layer owns only them.
- Tables are plain buffers stepped by the layer (replicated under torchrun); their optimizer
  is the paper's Adam under ``--table-optimizer auto`` (the default), the run's otherwise.

Measured figures: ``docs/methods/deeplight.md``.

Example::

    layer = build_compressor("deeplight", features, dim=16, budget="5x")
    layer = build_compressor("deeplight", features, dim=16, budget="5x", schedule="paper")
    layer = build_compressor("deeplight", features, dim=16, budget="10x", storage="int8")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from compressors.core.base import SCHEDULED, FeatureSpec, Stage
from compressors.core.registry import register
from compressors.pruning.entry_pruned import EntryPruned

if TYPE_CHECKING:
    from compressors.core.base import StageContext

log = logging.getLogger(__name__)
SCHEDULES = ("stage", "paper")


def deeplight_sparsity(target: float, step: int, decay_steps: float) -> float:
    """DeepLight's schedule: ``target · (1 − 0.99^(step / decay_steps))``."""
    return target * (1.0 - 0.99 ** (step / decay_steps))


def stage_sparsity(target: float, step: int, total: int, warmup: float, target_at: float) -> float:
    """DeepLight's curve fitted to a stage of ``total`` steps: 0 before ``warmup·total``,
    ``target · (1 − 0.01^x) / 0.99`` with ``x`` rising linearly to 1 at ``target_at·total``
    (the paper's curve, whose 99% point then lands there), ``target`` from then on."""
    start, end = warmup * total, target_at * total
    if step < start:
        return 0.0
    if step >= end:
        return target
    x = (step - start) / (end - start)
    return target * (1.0 - 0.01**x) / 0.99


@register
class DeepLight(EntryPruned):
    """Gradual magnitude pruning, then fine-tuning (module docstring)."""

    name = "deeplight"
    default_optimizer = "adam"  # the paper's; its criteria need it (docs/methods)
    option_help = {
        "schedule": "'stage': the paper's curve fitted to the prune stage (warmup, target_at); "
        "'paper': S·(1 − 0.99^(t/decay_steps)) over the stage's steps",
        "warmup": "share of the prune stage trained dense before pruning starts ('stage')",
        "target_at": "share of the prune stage at which the budget's sparsity is reached ('stage')",
        "decay_steps": "steps of the paper's schedule S·(1 − 0.99^(t/decay_steps)) (paper: 100)",
        "prune_every": "steps between magnitude-pruning passes",
        "regrow": "pruned entries are zeroed and may regrow until the prune stage ends (the "
        "references'); False: a pruned entry is masked for good",
        "prune_epochs": "epochs of the gradual-pruning stage (None: the run's)",
        "finetune_epochs": "epochs of the fine-tuning stage (None: the run's; 0: no such stage)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        storage: str = "fp32",
        schedule: str = "stage",
        warmup: float = 0.2,
        target_at: float = 0.8,
        decay_steps: float = 100.0,
        prune_every: int = 10,
        regrow: bool = True,
        prune_epochs: float | None = None,
        finetune_epochs: float | None = None,
        optimizer: str | None = None,
        init_scale: float = 0.01,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"deeplight: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if decay_steps <= 0 or prune_every < 1:
            raise ValueError("deeplight: decay_steps must be positive and prune_every >= 1")
        if not 0.0 <= warmup < target_at <= 1.0:
            raise ValueError(
                "deeplight: warmup and target_at must satisfy 0 <= warmup < target_at <= 1, "
                f"got {warmup}, {target_at}"
            )
        super().__init__(features, dim, budget_bytes, storage, optimizer, init_scale)
        self.schedule, self.warmup, self.target_at = schedule, warmup, target_at
        self.decay_steps = decay_steps
        self.prune_every = prune_every
        self.regrow = regrow
        # True while pruned entries may regrow (the prune stage with ``regrow``): the model
        # then reads the raw table, whose pruned entries the passes have zeroed.
        self._regrowing = False
        if finetune_epochs is not None and finetune_epochs < 0:
            raise ValueError(f"deeplight: finetune_epochs must be >= 0, got {finetune_epochs}")
        prune = Stage("prune", epochs=prune_epochs, **SCHEDULED)
        # finetune_epochs=0: no fine-tuning stage (the references prune while training, and
        # the stage schedule holds the target over its last share already).
        self.stages = (
            (prune,) if finetune_epochs == 0 else (prune, Stage("finetune", epochs=finetune_epochs))
        )

    def architecture_state(self) -> list[str]:
        return ["mask"]

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.target_entries / self.mask.numel()

    def sparsity_at(self, step: int, total: int) -> float:
        """The schedule's sparsity ``step`` steps into a prune stage of ``total`` steps."""
        if self.schedule == "paper":
            return deeplight_sparsity(self.target_sparsity, step, self.decay_steps)
        return stage_sparsity(self.target_sparsity, step, total, self.warmup, self.target_at)

    def values(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._regrowing:
            return weight
        return weight * self.mask[rows].to(weight.dtype)

    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        super().on_stage_start(stage, ctx)
        self._regrowing = stage.name == "prune" and self.regrow

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Keeps the ``(1 − sparsity)`` share of entries of largest magnitude (never fewer
        than the budget's). With ``regrow`` every entry competes and the rest are zeroed;
        otherwise only the live ones compete."""
        keep = max(round((1.0 - sparsity) * self.mask.numel()), self.target_entries)
        self.table.flush_decay()
        weight = self.table.weight

        def magnitude(start: int, stop: int) -> torch.Tensor:
            return weight[start:stop].abs()

        if self.regrow:
            self.keep_top(magnitude, keep, revive=True)
            weight.mul_(self.mask)
        elif keep < int(self.mask.sum()):
            self.keep_top(magnitude, keep)

    def after_step(self, ctx: StageContext) -> None:
        super().after_step(ctx)
        t = ctx.stage_step + 1  # steps of the stage taken, this one included
        if ctx.stage.name == "prune" and t % self.prune_every == 0:
            sparsity = self.sparsity_at(t, ctx.stage_steps)
            if sparsity > 0:
                self.prune_to(sparsity)

    def on_stage_end(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name == "prune":
            self.prune_to(self.target_sparsity)
            self._regrowing = False
            log.info("deeplight: pruned to sparsity %.4f", self.target_sparsity)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "schedule": self.schedule,
            "warmup": self.warmup,
            "target_at": self.target_at,
            "decay_steps": self.decay_steps,
            "regrow": self.regrow,
        }
