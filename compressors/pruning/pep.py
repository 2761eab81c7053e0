"""``pep`` — Plug-in Embedding Pruning (Liu et al., ICLR 2021, "Learnable Embedding Sizes
for Recommender Systems"; reference code ``ssui-liu/learnable-embed-sizes-for-RecSys``).

Every entry is reparameterised with a learnable soft threshold,
``ŵ = sign(w) · relu(|w| − g(s))`` with ``g = sigmoid``; ``s`` is one scalar per table entry
(``granularity="feature_dim"``, the default), per field and dim (``"field_dim"``) or per field
(``"field"``), initialised to ``threshold_init`` and trained with Adam at ``threshold_lr``
jointly with the table and the network. As in the reference, the only other force on ``s``
is Adam's (coupled) L2 weight decay ``threshold_decay``. Two stages:

1. **search** (training): every ``check_every`` steps the table's sparsity is measured; the
   first time it reaches the budget's sparsity (see :mod:`compressors.pruning.entry_pruned`) the
   mask ``|w| > g(s)`` is frozen, as the paper saves the pruned structure once the target
   is met (``fill_budget``, the default, then restores the pruned entries nearest their
   thresholds if the jump between two checks overshot the target; ``False`` keeps the
   paper's mask as found). The rest of the stage trains with the frozen mask (its weights
   are discarded by the rewind). If the target is never reached, the stage ends by keeping
   the largest ``|ŵ|`` entries up to the target (magnitude pruning), and says so: a warning
   with the
   sparsity the thresholds reached, and ``reached_sparsity`` / ``fallback`` in
   :meth:`PEP.hyperparameters` (the run's summary).
2. **retrain** (training) from the run's initial weights with the mask fixed
   (lottery-ticket rewind, the paper's setting; ``rewind=False`` keeps the searched weights).

The search stage runs its whole schedule and keeps what it found (``early_stop=False``,
``restore_best=False``): neither early stopping nor a restore of its best evaluation rolls
the thresholds, the frozen mask or the record (``found_step``, ``reached_sparsity``,
``fallback``) back to before the target was reached.

Options: ``granularity``, ``threshold_init``, ``threshold_lr``, ``threshold_decay``,
``check_every``, ``fill_budget``, ``rewind``, ``storage``, ``search_epochs``,
``retrain_epochs``, ``optimizer`` (the table rows'; None: the run's ``--table-optimizer``,
whose ``auto`` gives PEP the reference's Adam).

Deviations from the paper (reasons and figures: ``docs/methods/pep.md``):

- ``threshold_lr=0.1`` where the reference's thresholds learn at the network's lr
  (``threshold_lr=None``, one flag away): pruning starts after about
  ``(|threshold_init| − 5) / threshold_lr`` steps, 10,000 at the reference's lr, far beyond
  a run of the protocol's epochs.
- ``fill_budget``: a mask that overshot the budget's sparsity between two checks gets the
  pruned entries nearest their thresholds back (``False``: the paper's mask as found).
- If the thresholds never reach the budget's sparsity, magnitude pruning finishes the job,
  and the record says so.
- One run prunes to its budget's sparsity (the reference saves the table at several
  parameter counts along one run, ``candidate_p``).
- The table is a plain buffer stepped by the layer (fbgemm's fused kernels cannot
  reparameterise entries); under torchrun it is replicated, the ranks' row gradients
  averaged.

Example::

    layer = build_compressor("pep", features, dim=16, budget="5x")
    layer = build_compressor("pep", features, dim=16, budget="5x", threshold_lr=0.1)
    layer = build_compressor("pep", features, dim=16, budget="5x", granularity="field_dim")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from compressors.core.base import SCHEDULED, FeatureSpec, Stage
from compressors.core.hybrid import take_rows
from compressors.core.registry import register
from compressors.pruning.entry_pruned import EntryPruned, top_entries

if TYPE_CHECKING:
    from compressors.core.base import StageContext

log = logging.getLogger(__name__)
_CHUNK_ROWS = 1 << 18
GRANULARITIES = ("feature_dim", "field", "field_dim")


def threshold_shape(granularity: str, rows: int, fields: int, dim: int) -> tuple[int, int]:
    """The shape of ``s``: per table entry, per field and dim, or per field."""
    return {"feature_dim": (rows, dim), "field_dim": (fields, dim), "field": (fields, 1)}[
        granularity
    ]


def soft_threshold(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(w) · relu(|w| − threshold)`` (PEP's reparameterisation)."""
    return torch.sign(weight) * torch.relu(weight.abs() - threshold)


@register
class PEP(EntryPruned):
    """Learnable soft thresholds, then a lottery-ticket retrain (module docstring)."""

    name = "pep"
    default_optimizer = "adam"  # the paper's; its criteria need it (docs/methods)
    option_help = {
        "granularity": "one threshold per entry ('feature_dim', reference), per field and dim "
        "('field_dim') or per field ('field')",
        "threshold_init": "initial threshold logit s, g(s)=sigmoid(s) (reference -15 / -150)",
        "threshold_lr": "Adam learning rate of the thresholds (None: the network's, the "
        "reference's); pruning starts after about (|threshold_init| - 5) / threshold_lr steps",
        "threshold_decay": "L2 decay on the thresholds (the reference's 1e-5)",
        "check_every": "steps between checks of the budget's sparsity",
        "fill_budget": "when the frozen mask overshoots the budget's sparsity, restore the "
        "pruned entries nearest their thresholds up to it (False: the paper's mask as found)",
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
        granularity: str = "feature_dim",
        threshold_init: float = -15.0,
        threshold_lr: float | None = 0.1,
        threshold_decay: float = 1e-5,
        check_every: int = 10,
        fill_budget: bool = True,
        rewind: bool = True,
        search_epochs: float | None = None,
        retrain_epochs: float | None = None,
        optimizer: str | None = None,
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
        self.fill_budget = fill_budget
        shape = threshold_shape(granularity, self.table.rows, len(features), dim)
        self.threshold = nn.Parameter(torch.full(shape, float(threshold_init)))
        self.register_buffer("found", torch.zeros((), dtype=torch.bool))
        self.register_buffer("found_step", torch.full((), -1, dtype=torch.int64))
        # The sparsity the thresholds themselves reached (-1 until the search ends), and
        # whether the magnitude fallback had to finish the job.
        self.register_buffer("reached_sparsity", torch.full((), -1.0))
        self.register_buffer("fallback", torch.zeros((), dtype=torch.bool))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))
        self.stages = (
            Stage("search", epochs=search_epochs, **SCHEDULED),
            Stage("retrain", epochs=retrain_epochs, rewind=rewind),
        )

    def values(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if bool(self.found):
            return weight * self.mask[rows].to(weight.dtype)
        if self.granularity == "feature_dim":
            # A sparse gradient (the rows read): the trainer's Adam applies it as the dense
            # one without building a table-sized gradient each step (core.optim.Adam). The
            # rows are unique, so no repeated index sums in a thread-dependent order (the
            # reason for take_rows below); coalescing sorts them.
            threshold = F.embedding(rows, self.threshold, sparse=True)
            return soft_threshold(weight, torch.sigmoid(threshold))
        g = take_rows(torch.sigmoid(self.threshold), self.table.field_of(rows))
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
        return [
            "mask",
            "found",
            "found_step",
            "threshold",
            "reached_sparsity",
            "fallback",
            "filled",
        ]

    def extra_train_bytes(self) -> int:
        return self.threshold.numel() * 4 * 4  # the value, its gradient, Adam's two moments

    @torch.no_grad()
    def nonzeros(self) -> int:
        """Entries the model reads as non-zero. While searching, ``|w| > g(s)`` counted in
        place (``sign(w)·relu(|w| − g) ≠ 0`` exactly when ``|w| > g``, in floats too), chunk
        by chunk, without building the soft-thresholded values: the search checks it every
        ``check_every`` steps over the whole table."""
        if bool(self.found) or self.granularity != "feature_dim":
            return super().nonzeros()
        self.table.flush_decay()
        weight, total = self.table.weight, 0
        for s in range(0, self.table.rows, _CHUNK_ROWS):
            chunk = slice(s, min(s + _CHUNK_ROWS, self.table.rows))
            total += int((weight[chunk].abs() > torch.sigmoid(self.threshold[chunk])).sum())
        return total

    @classmethod
    def solve_budget(
        cls, features: Sequence[FeatureSpec], dim: int, budget_bytes: int, **options: Any
    ) -> dict[str, Any]:
        plan = super().solve_budget(features, dim, budget_bytes, **options)
        rows = sum(f.cardinality for f in features)
        shape = threshold_shape(options.get("granularity", "feature_dim"), rows, len(features), dim)
        # The thresholds, their gradient and Adam's two moments.
        plan["train_bytes"] += shape[0] * shape[1] * 4 * 4
        return plan

    def after_step(self, ctx: StageContext) -> None:
        super().after_step(ctx)
        if ctx.stage.name == "search" and not bool(self.found) and ctx.step % self.check_every == 0:
            if self.nonzeros() <= self.target_entries:
                self._freeze(ctx.step)

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.target_entries / self.mask.numel()

    @torch.no_grad()
    def _freeze(self, step: int) -> None:
        self.mask_nonzero_values()
        self.reached_sparsity.fill_(1 - int(self.mask.sum()) / self.mask.numel())
        self._fill()
        self.found.fill_(True)
        self.found_step.fill_(step)
        log.info(
            "pep: the thresholds reached sparsity %.4f (budget %.4f) at step %d; mask frozen%s",
            float(self.reached_sparsity),
            self.target_sparsity,
            step,
            f", {int(self.filled)} entries nearest their thresholds restored"
            if self.filled
            else "",
        )

    @torch.no_grad()
    def _fill(self) -> None:
        """``fill_budget``: the thresholds rise for every entry at once, so between two checks
        the sparsity can jump past the budget's. Restores the pruned entries with the largest
        ``|w| − g(s)`` (the nearest to surviving) up to the target: the budget's sparsity, as
        asked (figures: ``docs/methods/pep.md``). Chunk by chunk: no table-sized margins."""
        kept = int(self.mask.sum())
        if not self.fill_budget or kept >= self.target_entries:
            return
        self.table.flush_decay()
        weight, mask = self.table.weight, self.mask

        def margin(start: int, stop: int) -> torch.Tensor:
            if self.granularity == "feature_dim":
                gate = torch.sigmoid(self.threshold[start:stop])
            else:
                rows = torch.arange(start, stop, device=weight.device)
                gate = torch.sigmoid(self.threshold)[self.table.field_of(rows)]
            return (weight[start:stop].abs() - gate).masked_fill(mask[start:stop], float("inf"))

        chosen = torch.empty_like(mask)
        top_entries(margin, self.table.rows, self.target_entries, chosen)
        mask.copy_(chosen)
        self.filled.fill_(self.target_entries - kept)

    @torch.no_grad()
    def on_stage_end(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name != "search" or bool(self.found):
            return
        self.mask_nonzero_values()
        self.reached_sparsity.fill_(1 - int(self.mask.sum()) / self.mask.numel())
        self.fallback.fill_(True)
        log.warning(
            "pep: the thresholds reached sparsity %.4f in %d steps, not the budget's %.4f; "
            "keeping the largest |ŵ| entries up to the target (magnitude pruning). A larger "
            "threshold_lr starts the pruning sooner (module docstring)",
            float(self.reached_sparsity),
            ctx.step,
            self.target_sparsity,
        )
        self.keep_top(lambda start, stop: self.all_values(start, stop).abs(), self.target_entries)
        self.found.fill_(True)
        self.found_step.fill_(ctx.step)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "granularity": self.granularity,
            "found_step": int(self.found_step),
            "reached_sparsity": round(float(self.reached_sparsity), 4),
            "fallback": bool(self.fallback),
            "filled_entries": int(self.filled),
        }
