"""``optembed`` — OptEmbed (Lyu et al., CIKM 2022, arXiv 2208.04482; reference code
``fuyuanlyu/OptEmbed``): learned per-field row thresholds prune rows, an evolutionary search
picks one dim per field within the budget, then a retrain with both masks fixed.

Stages, each resumable: **supernet** (row ``v`` kept while ``‖e_v‖₁ / s_f − t_f > 0``, a
hard step with the reference's long-tailed straight-through derivative,
:func:`ste_derivative`; loss ``+ α·Σ_f exp(−t_f)``; every (sample, field) trains a random
prefix of its dims), **search** (row mask frozen; an evolution over per-field dims whose
candidates are repaired into the budget and scored by validation AUC, :meth:`OptEmbed.score`)
and **retrain** (both masks fixed, from the initial weights when ``rewind``). The stages in
detail, the reasoning and the measured figures: ``docs/methods/optembed.md``.

Options (``option_help`` says each): ``thresholds`` (``field`` | ``paper``), ``alpha``,
``threshold_lr``, ``generations``, ``mutations``, ``crossovers``, ``parents``,
``mutation_prob``, ``search_batches``, ``fill_budget``, ``rewind``, ``pruned_rows``,
``storage``, ``prune_rows``, ``search_dims``, ``supernet_epochs``, ``retrain_epochs``,
``optimizer``. Ablations: ``search_dims=False`` is OptEmbed-E, ``prune_rows=False``
OptEmbed-D. The paper's setting: ``thresholds=paper generations=30 mutations=10
crossovers=10 parents=10 fill_budget=False`` (and ``search_batches`` covering the split).

Export: kind ``pruned`` (:mod:`compressors.pruning.serving`): each field's kept rows at its
dim plus an id remap; ``serve_bytes`` is what :meth:`export` would write now, at most the
budget after the search; ``set_storage`` serves the same rows and dims at another dtype.

Deviations from the paper (and the reference):

- Thresholds in units of the field's mean row norm, trained with Adam (``thresholds="field"``);
  ``thresholds="paper"`` is the reference's raw L1 norm with SGD.
- The budget is enforced, and unused budget goes back to the supernet's best pruned rows
  inside the search (``fill_budget=True``; ``False`` is the paper's).
- A smaller search by default (10 generations of 10 children, 2,048 validation rows).
- Crossover cuts over fields (the reference's cut point is drawn over the dim); children are
  copies; mutation draws any allowed dim.
- Tables train with the run's table optimizer (plain fp32 buffers; replicated under
  torchrun, the ranks' row gradients averaged).
- ``pruned_rows="field_vector"`` (the reference's ``mode_oov='oov'``) starts at zero and
  passes a data gradient to the thresholds; ``"zero"`` (the default) is the paper's.

Example::

    layer = build_compressor("optembed", features, dim=16, budget="5x")
    layer = build_compressor("optembed", features, dim=16, budget="10x", storage="int8")
    layer = build_compressor("optembed", features, dim=16, budget="2x", search_dims=False)  # -E
    layer = build_compressor("optembed", features, dim=16, budget="5x", thresholds="paper")
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import (
    SCHEDULED,
    Compressor,
    ExportedEmbedding,
    FeatureSpec,
    MemoryReport,
    SearchedBytes,
    Stage,
    full_bytes,
)
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.collective import batch_share, union_rows
from compressors.core.hybrid import take_rows
from compressors.core.registry import register
from compressors.core.storage import check_dtype, optimizer_state_bytes, row_bytes
from compressors.pruning.bytes import dim_choices, index_bytes, row_plan
from compressors.pruning.entry_table import EntryTable, row_optimizer
from compressors.pruning.serving import export_pruned

if TYPE_CHECKING:
    from compressors.core.base import StageContext

log = logging.getLogger(__name__)

QUANTILE_STEPS = 1000
PRUNED_ROWS = ("zero", "field_vector")
#: ``thresholds`` modes and what ``alpha``, ``threshold_lr`` and the thresholds' optimizer
#: default to in each (module docstring: why ``field`` is the default)
THRESHOLD_MODES = {
    "field": {"alpha": 1e-3, "threshold_lr": 1e-2, "optimizer": "adam"},
    "paper": {"alpha": 3e-4, "threshold_lr": 3e-4, "optimizer": "sgd"},
}
SCALE_MOMENTUM = 0.9  # EMA of a field's mean row norm over the training batches
SEARCH_ROWS = 2048  # rows of the search's fixed validation sample (search_batches=None)
SCORE_ROWS = 65536  # rows (candidates x sample) per batched forward of the search


def ste_derivative(x: torch.Tensor) -> torch.Tensor:
    """The reference's long-tailed surrogate derivative of the unit step at ``x``."""
    a = x.abs()
    return torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, 0.4, 0.0))


class LongTailStep(torch.autograd.Function):
    """Forward ``x > 0`` (as float); backward ``grad · ste_derivative(x)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * ste_derivative(x)


def batched_auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROC AUC of each row of ``scores`` ``[C, N]`` against binary ``labels`` ``[N]`` (the
    Mann-Whitney statistic; tied scores count one half, as sklearn's)."""
    pos = labels > 0.5
    n_pos = int(pos.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.full((scores.shape[0],), float("nan"), device=scores.device)
    out = torch.empty(scores.shape[0], dtype=torch.float64, device=scores.device)
    for c, row in enumerate(scores.double()):
        values, inverse = torch.unique(row, return_inverse=True)
        if len(values) == len(row):  # no ties: ranks are the sort positions
            ranks = torch.empty_like(row)
            ranks[torch.argsort(row)] = torch.arange(
                1, len(row) + 1, dtype=row.dtype, device=row.device
            )
        else:  # a tie shares the mean of the ranks it spans
            counts = torch.bincount(inverse, minlength=len(values)).double()
            ends = torch.cumsum(counts, 0)
            ranks = (ends - (counts - 1) / 2)[inverse]
        out[c] = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def floor_bytes(
    features: Sequence[FeatureSpec],
    dim: int,
    storage: str,
    prune_rows: bool,
    search_dims: bool,
    oov: bool = False,
) -> int:
    """The fewest serve bytes the search can reach: one row per field at the smallest dim
    (plus the OOV row and the remap) with row pruning; every row at the smallest dim without."""
    d = dim_choices(dim, storage)[0] if search_dims else dim
    return sum(
        row_plan(f.name, f.cardinality, 1 if prune_rows else f.cardinality, d, oov).serve_bytes(
            storage
        )
        for f in features
    )


@register
class OptEmbed(SearchedBytes, Compressor):
    """Row pruning by learned thresholds + per-field dims by evolution (module docstring)."""

    data_parallel = True  # replicated state stays identical across ranks (base class)

    name = "optembed"
    default_optimizer = "adam"  # the paper's; its criteria need it (docs/methods)
    option_help = {
        "optimizer": "optimizer of the table rows: sgd, adagrad, rowwise_adagrad or adam "
        "(None: the run's --table-optimizer, as every method's tables)",
        "storage": "serving dtype of the kept rows (fp32, fp16, int8, int4, int2)",
        "prune_rows": "learn per-field row thresholds (False: OptEmbed-D, dims only)",
        "search_dims": "search per-field dims by evolution (False: OptEmbed-E, rows only)",
        "thresholds": "'field' (a row's L1 norm over its field's mean row norm, Adam) or "
        "'paper' (the raw L1 norm, SGD, alpha and threshold_lr 3e-4: the reference's)",
        "alpha": "weight of the threshold regulariser α·Σ exp(−t_f) (None: the mode's, "
        "1e-3 field, 3e-4 paper)",
        "threshold_lr": "learning rate of the thresholds (None: the mode's, 1e-2 with Adam "
        "field, 3e-4 with SGD paper)",
        "generations": "generations of the evolutionary search (reference 30)",
        "mutations": "children by mutation per generation (reference 10)",
        "crossovers": "children by crossover over fields per generation (reference 10)",
        "parents": "top candidates kept as parents each generation",
        "mutation_prob": "per-field probability that a mutation redraws its dim (reference 0.1)",
        "search_batches": "validation batches (training batch size) in the fixed sample every "
        f"candidate is scored on (None: {SEARCH_ROWS} rows' worth)",
        "rewind": "retrain from the initial weights (False: from the supernet's)",
        "pruned_rows": "what pruned ids read: 'zero' (reference default) or 'field_vector' "
        "(one learned vector per field, served as an extra row)",
        "fill_budget": "give budget a candidate's dims leave unused back to the supernet's best "
        "pruned rows, inside the search (False: the paper's, the supernet alone decides the rows)",
        "supernet_epochs": "epochs of the supernet stage (None: the run's)",
        "retrain_epochs": "epochs of the retrain stage (None: the run's)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        storage: str = "fp32",
        prune_rows: bool = True,
        search_dims: bool = True,
        thresholds: str = "field",
        alpha: float | None = None,
        threshold_lr: float | None = None,
        generations: int = 10,
        mutations: int = 5,
        crossovers: int = 5,
        parents: int = 5,
        mutation_prob: float = 0.1,
        search_batches: int | None = None,
        rewind: bool = True,
        pruned_rows: str = "zero",
        fill_budget: bool = True,
        supernet_epochs: float | None = None,
        retrain_epochs: float | None = None,
        optimizer: str | None = None,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        check_dtype(storage, dim)
        if not (prune_rows or search_dims):
            raise ValueError("optembed: prune_rows and search_dims cannot both be off")
        if pruned_rows not in PRUNED_ROWS:
            raise ValueError(
                f"optembed: pruned_rows must be one of {PRUNED_ROWS}, got {pruned_rows!r}"
            )
        if pruned_rows == "field_vector" and not prune_rows:
            raise ValueError(
                "optembed: pruned_rows='field_vector' needs prune_rows (no row is pruned)"
            )
        if thresholds not in THRESHOLD_MODES:
            raise ValueError(
                f"optembed: thresholds must be one of {sorted(THRESHOLD_MODES)}, got {thresholds!r}"
            )
        if search_batches is not None and search_batches < 1:
            raise ValueError(f"optembed: search_batches must be >= 1, got {search_batches}")
        if generations < 1 or mutations + crossovers < 1 or parents < 2:
            raise ValueError("optembed: needs generations >= 1, a population and parents >= 2")
        if not 0.0 <= mutation_prob <= 1.0:
            raise ValueError(f"optembed: mutation_prob must lie in [0, 1], got {mutation_prob}")
        self.storage = storage
        self.prune_rows = prune_rows
        self.search_dims = search_dims
        mode = THRESHOLD_MODES[thresholds]
        self.thresholds = thresholds
        self.normalise = thresholds == "field"
        self.alpha = mode["alpha"] if alpha is None else alpha
        self.threshold_lr = mode["threshold_lr"] if threshold_lr is None else threshold_lr
        self.threshold_optimizer = mode["optimizer"]
        self.generations = generations
        self.mutations = mutations
        self.crossovers = crossovers
        self.parents = parents
        self.mutation_prob = mutation_prob
        self.search_batches = search_batches
        self.pruned_rows = pruned_rows
        self.fill_budget = fill_budget
        self.field_vector = pruned_rows == "field_vector"
        self.choices = dim_choices(dim, storage) if search_dims else [dim]
        floor = floor_bytes(features, dim, storage, prune_rows, search_dims, self.field_vector)
        if floor > budget_bytes:
            raise BudgetError(
                f"optembed: even {'one row per field' if prune_rows else 'every row'} at dim "
                f"{self.choices[0]} ({storage}) needs {describe_bytes(floor)} "
                f"({self.full_bytes / floor:.1f}x) but the budget is "
                f"{describe_bytes(budget_bytes)} ({self.full_bytes / budget_bytes:.1f}x)"
            )
        self.stages = (
            Stage("supernet", epochs=supernet_epochs, **SCHEDULED),
            Stage("search", trains=False),
            Stage("retrain", epochs=retrain_epochs, rewind=rewind),
        )
        self.table = EntryTable(features, dim, optimizer, init_scale)
        self.threshold = nn.Parameter(torch.zeros(len(features)))
        # The per-field OOV vectors (field_vector only): a plain parameter, so the network's
        # Adam trains it; zero at first, so pruned ids read zeros until it learns.
        self.oov = nn.Parameter(torch.zeros(len(features), dim)) if self.field_vector else None
        self.register_buffer("row_mask", torch.ones(self.table.rows, dtype=torch.bool))
        self.register_buffer("dims", torch.full((len(features),), dim, dtype=torch.int64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("thresholds_raised", torch.zeros((), dtype=torch.bool))
        # Each field's mean row L1 norm in the training batches (an EMA; 0 = not seen yet):
        # with thresholds="field" a row's norm is read in units of it.
        self.register_buffer("field_scale", torch.zeros(len(features)))
        self._capture: list[KeyedJaggedTensor] | None = None  # the search's sample KJTs
        self._inject: torch.Tensor | None = None  # a scoring forward's embeddings
        self._sample: list[dict[str, Any]] | None = None
        self._order: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._consts: tuple[Any, ...] | None = None
        # Rows per field the supernet's step kept when the mask froze (before fit and fill).
        self.register_buffer("supernet_kept", torch.full((len(features),), -1, dtype=torch.int64))

    # ---------------------------------------------------------------- plan (arithmetic)
    def plan_context(self) -> dict[str, Any]:
        return {"table_optimizer": self.table_optimizer}

    @classmethod
    def solve_budget(
        cls, features: Sequence[FeatureSpec], dim: int, budget_bytes: int, **options: Any
    ) -> dict[str, Any]:
        """What a run at this budget will hold, without tensors: the search keeps serve bytes
        at most the budget (exact bytes depend on the learned masks); training holds the full
        fp32 table, its optimizer state and the masks."""
        storage = options.get("storage", "fp32")
        prune_rows = options.get("prune_rows", True)
        search_dims = options.get("search_dims", True)
        oov = options.get("pruned_rows", "zero") == "field_vector"
        floor = floor_bytes(features, dim, storage, prune_rows, search_dims, oov)
        rows = sum(f.cardinality for f in features)
        train = (
            rows * dim * 4
            + optimizer_state_bytes(rows, dim, row_optimizer(options))
            + rows
            + len(features) * (4 + 8)
            + (len(features) * dim * 4 * 3 if oov else 0)  # OOV vectors and their Adam moments
        )
        return {
            "method": cls.name,
            "feasible": floor <= budget_bytes,
            "serve_bytes_max": budget_bytes,
            "floor_bytes": floor,
            "train_bytes": train,
            "full_bytes": full_bytes(features, dim),
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Runs from before the budget fill recorded no supernet counts: read them as unknown.
        state_dict.setdefault(prefix + "supernet_kept", torch.full_like(self.supernet_kept, -1))
        # ... nor field scales: their thresholds were raw L1 norms (scale 1).
        state_dict.setdefault(prefix + "field_scale", torch.ones_like(self.field_scale))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- forward
    def _read_rows(
        self, rows: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Kept rows (``keep`` 1) read their values, pruned ones zeros or their field's OOV
        vector; ``keep`` may carry the straight-through gradient."""
        keep = keep.unsqueeze(1)
        if self.oov is None:
            return weight * keep
        return weight * keep + (1 - keep) * self.oov[self.table.field_of(rows)]

    def _supernet_rows(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.prune_rows:
            return weight
        fields = self.table.field_of(rows)
        norms = weight.abs().sum(1)
        if self.normalise:
            if self.training:
                self._track_scale(rows, norms.detach())
            norms = norms / take_rows(self.scales(), fields)
        x = norms - take_rows(self.threshold, fields)
        return self._read_rows(rows, weight, LongTailStep.apply(x))

    @torch.no_grad()
    def _track_scale(self, rows: torch.Tensor, norms: torch.Tensor) -> None:
        """Moves each field's scale towards the mean L1 norm of its rows in this batch (the
        global batch's under torchrun: every rank's rows pooled)."""
        rows, norms = union_rows(rows, norms)
        fields = self.table.field_of(rows)
        # Every field at once, unseen ones kept by where (no boolean indexing: no
        # device-to-host sync each step on a GPU).
        count = fields.new_zeros(self.num_features).index_add_(0, fields, torch.ones_like(fields))
        total = torch.zeros(self.num_features, device=norms.device).index_add_(0, fields, norms)
        mean = total / count.clamp(min=1)
        old = self.field_scale
        moved = torch.where(old > 0, SCALE_MOMENTUM * old + (1 - SCALE_MOMENTUM) * mean, mean)
        self.field_scale.copy_(torch.where(count > 0, moved, old))

    def scales(self) -> torch.Tensor:
        """What a row's L1 norm is divided by before its threshold: the field's tracked mean
        norm (``thresholds="field"``), 1 for raw norms or a field not seen yet."""
        if not self.normalise:
            return torch.ones(self.num_features, device=self.field_scale.device)
        return torch.where(self.field_scale > 0, self.field_scale, 1.0)

    def _masked_rows(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._read_rows(rows, weight, self.row_mask[rows].to(weight.dtype))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if self._inject is not None:  # the search scores precomputed embeddings in batch
            return self._inject
        if self._capture is not None:
            self._capture.append(features)
        if bool(self.frozen):
            out = self.table(features, self._masked_rows)
            cols = torch.arange(self.dim, device=out.device)
            return out * (cols < self.dims.unsqueeze(1)).to(out.dtype)  # [F, D] dim masks
        out = self.table(features, self._supernet_rows)
        if self.training and self.search_dims:
            # A uniformly drawn prefix 1..D per (sample, field): every dim choice trains.
            fields = out.shape[1]
            keep = batch_share(
                lambda n: torch.randint(1, self.dim + 1, (n, fields), device=out.device),
                out.shape[0],
            ).unsqueeze(2)
            out = out * (torch.arange(self.dim, device=out.device) < keep).to(out.dtype)
        return out

    def penalty(self) -> torch.Tensor:
        if not self.prune_rows or bool(self.frozen):
            return torch.zeros((), device=self.threshold.device)
        return self.alpha * torch.exp(-self.threshold).sum()

    def optimizer_groups(self) -> list[dict[str, Any]]:
        if not self.prune_rows:
            return []
        return [
            {
                "params": [self.threshold],
                "optimizer": self.threshold_optimizer,
                "lr": self.threshold_lr,
            }
        ]

    def rewind_keep(self) -> list[str]:
        return [
            "threshold",
            "row_mask",
            "dims",
            "frozen",
            "thresholds_raised",
            "supernet_kept",
            "field_scale",
        ]

    # ---------------------------------------------------------------- stages
    @torch.no_grad()
    def current_row_mask(self) -> torch.Tensor:
        """The rows kept now: the frozen mask, or the supernet's hard step."""
        if bool(self.frozen) or not self.prune_rows:
            return self.row_mask.clone()
        return self.row_scores() > 0

    @torch.no_grad()
    def row_scores(self) -> torch.Tensor:
        """Every row's ``‖e‖₁/s_f − t_f``, the step's own argument (``s_f`` = 1 for raw norms):
        above 0 the supernet keeps the row; the fill brings pruned rows back highest first."""
        fields = self.table.field_of(torch.arange(self.table.rows, device=self.row_mask.device))
        return self.table.row_norms() / self.scales()[fields] - self.threshold.detach()[fields]

    def run_stage(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name != "search":
            super().run_stage(stage, ctx)
        state = ctx.restored_state()
        if state is None:
            with torch.no_grad():
                self.row_mask.copy_(self.current_row_mask())
                self.frozen.fill_(True)
                self.supernet_kept.copy_(torch.tensor(self.kept_per_field()))
            self._fit_rows()
            state = {"generation": 0, "population": [], "best": [], "best_auc": -math.inf}
        try:
            if not self.search_dims:
                self.dims.fill_(self.dim)
            else:
                self._search(ctx, state)
            self._fill_rows()
        finally:
            self._sample = self._order = None

    # ---------------------------------------------------------------- budget arithmetic
    def kept_per_field(self) -> list[int]:
        mask = self.current_row_mask()
        return [int(mask[self.table.field_slice(f)].sum()) for f in range(self.num_features)]

    def plans(self, dims: Sequence[int] | None = None, kept: Sequence[int] | None = None):
        dims = self.dims.tolist() if dims is None else dims
        kept = self.kept_per_field() if kept is None else kept
        return [
            row_plan(f.name, f.cardinality, k, d, self.field_vector)
            for f, k, d in zip(self.features, kept, dims, strict=True)
        ]

    def candidate_bytes(self, dims: Sequence[int], kept: Sequence[int]) -> int:
        return sum(p.serve_bytes(self.storage) for p in self.plans(dims, kept))

    @torch.no_grad()
    def _fit_rows(self) -> None:
        """Raises thresholds by an L1-norm quantile until the kept rows fit at the least dim."""
        if not self.prune_rows:
            return
        low = [self.choices[0]] * self.num_features
        kept = self.kept_per_field()
        if self.candidate_bytes(low, kept) <= self.budget_bytes:
            return
        fields = self.table.field_of(torch.arange(self.table.rows, device=self.row_mask.device))
        norms = self.table.row_norms() / self.scales()[fields]
        per_field = []
        for f in range(self.num_features):
            sl = self.table.field_slice(f)
            ids = torch.nonzero(self.row_mask[sl]).squeeze(1) + sl.start
            order = torch.argsort(norms[ids], stable=True)
            per_field.append(ids[order])
        for step in range(1, QUANTILE_STEPS + 1):
            q = step / QUANTILE_STEPS
            cuts = [
                min(len(ids) - 1, int(q * len(ids))) if len(ids) > 1 else 0 for ids in per_field
            ]
            if self.candidate_bytes(
                low, [len(i) - c for i, c in zip(per_field, cuts, strict=True)]
            ) <= (self.budget_bytes):
                break
        else:
            raise BudgetError(f"{self.name}: the kept rows cannot fit the budget at dim {low[0]}")
        for f, (ids, cut) in enumerate(zip(per_field, cuts, strict=True)):
            if cut:
                dropped = ids[:cut]
                self.row_mask[dropped] = False
                self.threshold[f] = torch.maximum(self.threshold[f], norms[dropped].max())
        self.thresholds_raised.fill_(True)
        log.warning(
            "%s: the supernet's row mask did not fit %s even at dim %d; every field dropped "
            "its %.1f%% lowest-L1 kept rows (thresholds raised)",
            self.name,
            describe_bytes(self.budget_bytes),
            low[0],
            100 * q,
        )

    # ---------------------------------------------------------------- the fill
    @torch.no_grad()
    def _fill_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen mask's pruned rows, best :meth:`row_scores` first: ``(rows, their
        fields, each one's 1-based place among its field's)``."""
        if self._order is None:
            pruned = torch.nonzero(~self.row_mask).squeeze(1)
            score = self.row_scores()[pruned]
            rows = pruned[torch.argsort(score, descending=True, stable=True)]
            fields = self.table.field_of(rows)
            # Place within the field: rank in a stable sort by field, minus the field's start.
            by_field = torch.argsort(fields, stable=True)
            starts = torch.cumsum(torch.bincount(fields, minlength=self.num_features), 0)
            starts = torch.cat([starts.new_zeros(1), starts[:-1]])
            place = torch.empty_like(rows)
            place[by_field] = (
                torch.arange(len(rows), device=rows.device) - starts[fields[by_field]] + 1
            )
            self._order = (rows, fields, place)
        return self._order

    def _field_bytes(self, fields: torch.Tensor, kept: torch.Tensor, dims: torch.Tensor):
        """Serve bytes of ``fields`` holding ``kept`` rows at ``dims`` (vectorised
        :func:`~compressors.pruning.bytes.row_plan`; every argument a tensor of one length)."""
        key = (self.storage, fields.device)
        if self._consts is None or self._consts[0] != key:
            packable = set(dim_choices(self.dim, self.storage)) | {self.dim}
            on = {"device": fields.device}
            self._consts = (
                key,
                torch.tensor([f.cardinality for f in self.features], **on),
                torch.tensor(  # 0 for dims the storage cannot pack (never a field's)
                    [
                        row_bytes(d, self.storage) if d in packable else 0
                        for d in range(self.dim + 1)
                    ],
                    **on,
                ),
                torch.tensor([index_bytes(f.cardinality, 1) for f in self.features], **on),
                torch.tensor([index_bytes(f.cardinality, 2**15) for f in self.features], **on),
            )
        _, cards, rbs, narrow, wide = self._consts
        cards, rb = cards[fields], rbs[dims]
        oov = int(self.field_vector)
        stored = kept + oov
        # An array remap widens to int32 past int16's range (index_bytes of 2**15 rows).
        index = torch.where(stored > 2**15 - 1, wide[fields], narrow[fields])
        out = torch.where(kept >= cards, cards * rb, stored * rb + index)
        if not oov:  # a field without rows or an OOV row is empty: no bytes
            out = torch.where(kept == 0, torch.zeros_like(out), out)
        return out

    @torch.no_grad()
    def filled_rows(self, dims: Sequence[int]) -> torch.Tensor:
        """The pruned rows ``fill_budget`` gives back at ``dims``: the supernet's best first,
        each while its exact bytes (remap included) still fit; a row whose field's next row
        does not fit is passed over, as are the rest of that field's. Empty without the fill."""
        device = self.row_mask.device
        if not (self.prune_rows and self.fill_budget):
            return torch.zeros(0, dtype=torch.int64, device=device)
        rows, fields, place = self._fill_order()
        kept0 = torch.tensor(self.kept_per_field(), device=device)
        dim_of = torch.tensor(list(dims), device=device)
        spare = self.budget_bytes - self.candidate_bytes(dims, kept0.tolist())
        # A row's exact marginal bytes: its field grows from kept0 + place - 1 to kept0 + place
        # rows (rows are taken as a prefix or passed over a field at a time, so place holds).
        k = kept0[fields] + place
        cost = self._field_bytes(fields, k, dim_of[fields]) - self._field_bytes(
            fields, k - 1, dim_of[fields]
        )
        taken = []
        alive = torch.ones(len(rows), dtype=torch.bool, device=device)
        while spare > 0:
            idx = torch.nonzero(alive).squeeze(1)
            if not len(idx):
                break
            cum = torch.cumsum(cost[idx], 0)
            n = int(torch.searchsorted(cum, torch.tensor(spare, device=device), right=True))
            if n:
                taken.append(idx[:n])
                spare -= int(cum[n - 1])
                alive[idx[:n]] = False
                continue
            alive &= fields != fields[idx[0]]  # its field's next row does not fit
        return rows[torch.cat(taken)] if taken else rows.new_zeros(0)

    @torch.no_grad()
    def _fill_rows(self) -> int:
        """Gives the budget the searched dims leave unused back to pruned rows
        (:meth:`filled_rows`); returns how many rows it added. Idempotent: a resumed stage
        that calls it again finds nothing more that fits."""
        added = self.filled_rows(self.dims.tolist())
        if len(added):
            self.row_mask[added] = True
            self._order = None
            log.info(
                "%s: filled the budget with %d of the supernet's pruned rows (best score first)",
                self.name,
                len(added),
            )
        if self.memory().serve_bytes > self.budget_bytes:  # the arithmetic above prevents it
            raise RuntimeError(f"{self.name}: the budget fill overshot the budget")
        return len(added)

    @torch.no_grad()
    def _column_mass(self) -> np.ndarray:
        """``[F, D]``: frequency-weighted L1 mass of each column over a field's kept rows."""
        mass = np.zeros((self.num_features, self.dim))
        w = self.table.weight
        for f, spec in enumerate(self.features):
            sl = self.table.field_slice(f)
            rows = w[sl].abs() * self.row_mask[sl].unsqueeze(1)
            freq = (
                torch.as_tensor(spec.frequencies, dtype=torch.float32, device=w.device) + 1.0
                if spec.frequencies is not None
                else torch.ones(spec.cardinality, device=w.device)
            )
            mass[f] = (freq.unsqueeze(1) * rows).sum(0).double().cpu().numpy()
        return mass

    def repair(self, dims: list[int], kept: Sequence[int], mass: np.ndarray) -> list[int]:
        """Lowers dims, cheapest loss of L1 mass per byte first, until ``dims`` fit."""
        dims = list(dims)
        index = {d: i for i, d in enumerate(self.choices)}
        while self.candidate_bytes(dims, kept) > self.budget_bytes:
            best, best_cost = None, None
            for f in range(self.num_features):
                i = index[dims[f]]
                if i == 0 or kept[f] == 0:
                    continue
                lower = self.choices[i - 1]
                card, oov = self.features[f].cardinality, self.field_vector
                now = row_plan("", card, kept[f], dims[f], oov)
                then = row_plan("", card, kept[f], lower, oov)
                freed = now.serve_bytes(self.storage) - then.serve_bytes(self.storage)
                cost = float(mass[f, lower : dims[f]].sum()) / max(freed, 1)
                if best_cost is None or cost < best_cost:
                    best, best_cost = (f, lower), cost
            if best is None:
                raise BudgetError(f"{self.name}: no dims fit the budget")  # _fit_rows prevents it
            dims[best[0]] = best[1]
        return dims

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def _search_sample(self, ctx: StageContext) -> list[dict[str, Any]]:
        """The fixed validation sample every candidate is scored on: the first batches of
        ``ctx.valid_batches()`` (seeded by the run and stage, so a resumed search draws the
        same), each looked up in the table once."""
        batches = ctx.valid_batches()
        sample, rows = [], 0
        ctx.model.eval()
        self._capture = []

        def more() -> bool:
            if self.search_batches is None:
                return rows < SEARCH_ROWS
            return len(sample) < self.search_batches

        try:
            while more():
                batch = next(batches)
                ctx.model(batch.dense_features, batch.sparse_features)  # forward captures the KJT
                found, inverse, offsets = self.table.locate(self._capture.pop())
                labels = batch.labels
                sample.append(
                    {
                        "dense": batch.dense_features,
                        "sparse": batch.sparse_features,
                        "labels": labels,
                        "rows": found,
                        "inverse": inverse,
                        "offsets": offsets,
                    }
                )
                # Padding rows (label -1) do not count; under torchrun each rank holds its
                # share of every batch, so the sample's size is counted over all ranks.
                rows += int(ctx.gather((labels >= 0).sum().view(1)).sum())
        finally:
            self._capture = None
        return sample

    @torch.no_grad()
    def score(self, candidates: Sequence[Sequence[int]], ctx: StageContext) -> list[float]:
        """Validation AUC of the frozen supernet at each candidate's dims (and, with
        ``fill_budget``, with the rows the fill gives back at those dims) on the fixed sample.
        The table lookups are done once; per candidate only its row and dim masks are applied
        and the candidates go through the model together, in forwards of up to
        ``SCORE_ROWS`` rows; no model is copied."""
        if self._sample is None:
            self._sample = self._search_sample(ctx)
        # Each candidate's kept rows, read only at the sample's rows (a mask of every row per
        # candidate would cost a byte per id per candidate): the frozen mask or a filled row.
        keeps = []
        for dims in candidates:
            filled = self.filled_rows(dims)
            keeps.append(
                [
                    self.row_mask[part["rows"]] | torch.isin(part["rows"], filled)
                    for part in self._sample
                ]
            )
            del filled
        device = self.row_mask.device
        cols = torch.arange(self.dim, device=device)
        dmasks = (
            cols < torch.tensor([list(d) for d in candidates], device=device).unsqueeze(2)
        ).float()
        logits: list[list[torch.Tensor]] = [[] for _ in candidates]
        labels = []
        ctx.model.eval()
        for p, part in enumerate(self._sample):
            weight = self.table.weight[part["rows"]]
            size = len(part["labels"])
            step = max(1, SCORE_ROWS // max(size, 1))
            for lo in range(0, len(candidates), step):
                group = range(lo, min(lo + step, len(candidates)))
                embs = []
                for c in group:
                    keep = keeps[c][p].to(weight.dtype)
                    values = self._read_rows(part["rows"], weight, keep)
                    pooled = self.table.pool(part["inverse"], values, part["offsets"])
                    embs.append(pooled * dmasks[c])
                self._inject = torch.cat(embs)
                try:
                    dense = part["dense"].repeat(len(group), 1)
                    out = ctx.model(dense, part["sparse"]).view(len(group), size)
                finally:
                    self._inject = None
                for i, c in enumerate(group):
                    logits[c].append(out[i])
            labels.append(part["labels"])
        y = torch.cat(labels)
        valid = y >= 0
        scores = torch.stack([torch.cat(c) for c in logits])[:, valid]
        # Every rank scores its share of the sample; all decide on the pooled one.
        y, scores = ctx.gather(y[valid]), ctx.gather(scores.T.contiguous()).T
        return batched_auc(scores, y).tolist()

    # ---------------------------------------------------------------- evolution
    def _random_dim(self, gen: torch.Generator) -> int:
        return self.choices[int(torch.randint(len(self.choices), (1,), generator=gen))]

    def _search(self, ctx: StageContext, state: dict[str, Any]) -> None:
        gen = ctx.rng()
        if "rng" in state:
            gen.set_state(state["rng"])
        kept = self.kept_per_field()
        mass = self._column_mass()
        population = [list(c) for c in state["population"]]
        if not population:
            # Random candidates, and one that starts every field at D (repaired into the
            # budget by the mass heuristic): a strong start the evolution can only improve on.
            size = self.mutations + self.crossovers
            population = [self.repair([self.dim] * self.num_features, kept, mass)] + [
                self.repair([self._random_dim(gen) for _ in self.features], kept, mass)
                for _ in range(size - 1)
            ]
        cache = {tuple(c): s for c, s in state.get("cache", [])}
        best, best_auc = list(state["best"]), float(state["best_auc"])
        bar = ctx.progress(self.generations, "search")
        bar.update(state["generation"])
        for generation in range(state["generation"], self.generations):
            new = list(dict.fromkeys(tuple(c) for c in population if tuple(c) not in cache))
            if new:
                cache.update(zip(new, self.score(new, ctx), strict=True))
            scores = [cache[tuple(c)] for c in population]
            order = sorted(range(len(population)), key=lambda i: -scores[i])
            ranked = [population[i] for i in order]
            if not best or scores[order[0]] > best_auc:
                best, best_auc = list(ranked[0]), scores[order[0]]
            top = ranked[: self.parents]
            children = []
            for i in range(self.mutations):
                child = list(top[i % len(top)])
                for f in range(self.num_features):
                    if float(torch.rand((), generator=gen)) < self.mutation_prob:
                        child[f] = self._random_dim(gen)
                children.append(child)
            for _ in range(self.crossovers):
                if len(top) < 2:
                    break
                x, y = torch.randperm(len(top), generator=gen)[:2].tolist()
                cut = int(torch.randint(1, max(self.num_features, 2), (1,), generator=gen))
                children.append(top[x][:cut] + top[y][cut:])
            population = [self.repair(c, kept, mass) for c in children]
            bar.update(1)
            bar.set_postfix(auc=f"{best_auc:.4f}")
            ctx.checkpoint(
                {
                    "generation": generation + 1,
                    "population": population,
                    "best": best,
                    "best_auc": best_auc,
                    "cache": [[list(k), v] for k, v in cache.items()],
                    "rng": gen.get_state(),
                }
            )
        bar.close()
        if self.candidate_bytes(best, kept) > self.budget_bytes:  # repair guarantees it
            raise RuntimeError(f"{self.name}: the search returned an over-budget candidate")
        self.dims.copy_(torch.tensor(best))
        log.info("%s: searched dims %s (valid AUC %.4f)", self.name, best, best_auc)

    # ---------------------------------------------------------------- memory and export
    def memory(self) -> MemoryReport:
        plans = self.plans()
        parts = {f"field.{p.name}": p.serve_bytes(self.storage) for p in plans}
        train = (
            self.table.train_bytes()
            + self.row_mask.numel()
            + self.threshold.numel() * 4
            + self.dims.numel() * 8
            + (self.oov.numel() * 4 * 3 if self.oov is not None else 0)  # + Adam's moments
        )
        return MemoryReport(
            serve_bytes=sum(parts.values()),
            train_bytes=train,
            full_bytes=self.full_bytes,
            parts=parts,
        )

    @torch.no_grad()
    def export(self) -> ExportedEmbedding:
        mask = self.current_row_mask()
        w = self.table.weight

        def values(f: int) -> torch.Tensor:
            sl = self.table.field_slice(f)
            return w[sl] * mask[sl].unsqueeze(1)

        return export_pruned(
            self.name,
            self.dim,
            self.plans(
                kept=[int(mask[self.table.field_slice(f)].sum()) for f in range(len(self.features))]
            ),
            self.storage,
            values,
            lambda f: mask[self.table.field_slice(f)],
            None if self.oov is None else lambda f: self.oov.detach()[f],
        )

    def set_storage(self, dtype: str) -> None:
        """Serves the searched rows and dims at ``dtype`` (refused when a field's dim does
        not pack there, e.g. an odd dim at int8)."""
        check_dtype(dtype, self.dim)
        step = dim_choices(self.dim, dtype)[0]
        for p in self.plans():
            if p.form in ("dense", "rows") and p.dim % step:
                raise ValueError(
                    f"{self.name}: field {p.name!r} was searched to dim {p.dim}, which {dtype} "
                    f"rows cannot hold (dims must be multiples of {step})"
                )
        self.storage = dtype

    def hyperparameters(self) -> dict[str, Any]:
        kept = self.kept_per_field()
        return {
            "storage": self.storage,
            "prune_rows": self.prune_rows,
            "search_dims": self.search_dims,
            "pruned_rows": self.pruned_rows,
            "dims": dict(zip(self.feature_names, self.dims.tolist(), strict=True)),
            "kept_rows": dict(zip(self.feature_names, kept, strict=True)),
            "thresholds": dict(
                zip(self.feature_names, [round(t, 5) for t in self.threshold.tolist()], strict=True)
            ),
            "thresholds_raised": bool(self.thresholds_raised),
            "fill_budget": self.fill_budget,
            "thresholds_mode": self.thresholds,
            "field_scale": dict(
                zip(
                    self.feature_names,
                    [round(s, 5) for s in self.field_scale.tolist()],
                    strict=True,
                )
            ),
            "supernet_kept_rows": dict(
                zip(self.feature_names, self.supernet_kept.tolist(), strict=True)
            ),
        }
