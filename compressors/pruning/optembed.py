"""``optembed`` — OptEmbed (Lyu et al., CIKM 2022, arXiv 2208.04482; reference code
``fuyuanlyu/OptEmbed``: ``supernet.py``, ``evolution.py``, ``retrain.py``).

Three stages, each resumable:

1. **supernet** (training). Field ``f`` has a learnable threshold ``t_f`` (init 0); row ``v``
   is kept while ``‖e_v‖₁ − t_f > 0`` (hard step forward). The backward pass of the step is
   the reference's long-tailed straight-through derivative of ``x = ‖e‖₁ − t``: ``2 − 4|x|``
   for ``|x| ≤ 0.4``, ``0.4`` for ``0.4 < |x| ≤ 1``, ``0`` beyond (:func:`ste_derivative`);
   it reaches both ``t`` and the embedding values. The loss adds ``α·Σ_f exp(−t_f)``
   (:meth:`OptEmbed.penalty`); thresholds train with plain SGD at ``threshold_lr``
   (an optimizer group), the table as every table does (row-wise Adagrad at the run's
   ``table_lr``), the network with Adam. Pruned rows read as zeros. While training, every
   (sample, field) keeps a uniformly drawn prefix ``1..D`` of its embedding (applied to the
   pooled vector, which equals masking each row since pooling is a sum); evaluation uses all
   ``D`` dims.
2. **search** (the method's own procedure). The row mask is frozen. If even at the smallest
   dim the kept rows (plus their remaps) exceed the budget, every field drops the same
   quantile of its kept rows by L1 norm (its threshold rises to the largest dropped norm)
   until they fit, and a warning says so. Then an evolutionary search over one dim per field:
   a random first population, then each generation ``mutations`` children of the top
   ``parents`` (per-gene probability ``mutation_prob`` of a new random dim) and
   ``crossovers`` children of two distinct top parents cut at one point *over the fields*.
   Fitness is the validation AUC of the supernet with each field cut to its candidate dim
   (by masking, no rebuild) on the first ``search_batches`` validation batches (a fixed
   subsample). A candidate over budget is repaired before it is scored: the field whose next
   lower dim loses the least frequency-weighted L1 mass per byte saved is lowered, until it
   fits, so no candidate — and no result — is ever over budget. One progress-bar tick and
   one checkpoint per generation; a killed search resumes at its last generation.
   **Filling the budget** (``fill_budget=True``, the default): with the dims chosen, budget
   the supernet's mask left unused goes back to pruned rows, the supernet's best first (the
   highest ``‖e‖₁ − t_f``, the step's own score), each added while its exact bytes (remap
   included) still fit; so ``serve_bytes`` ends within one row of the budget instead of
   wherever the thresholds happened to stop. ``fill_budget=False`` is the paper's: the
   supernet alone decides the rows (``supernet_kept_rows`` in the summary either way).
3. **retrain** (training) with both masks fixed, from the run's initial weights
   (``rewind=True``, the paper's lottery-ticket setting; ``rewind=False`` continues from the
   supernet's weights).

Ablations (the paper's): ``search_dims=False`` is OptEmbed-E (rows only, all fields at
``D``); ``prune_rows=False`` is OptEmbed-D (dims only, no thresholds).

Export (kind ``pruned``, see :mod:`compressors.pruning.common`): each field's kept rows at
its chosen dim (``storage`` any fbgemm dtype), plus an id remap for fields that lost rows
(pruned ids -> ``-1``, skipped by fbgemm's TBE, or -> the field's OOV row), zero-padded back
to ``D``. ``set_storage`` (``ctr export --storage``) serves the same rows and dims at another
dtype when every field's dim packs there.
``serve_bytes`` is always what :meth:`export` would write now; after the search it is at
most the budget.

Where this deviates from the reference, and why:

- Crossover cuts over fields; the reference draws its cut point in ``[1, latent_dim]`` and
  slices the per-field candidate there — a bug whenever ``latent_dim ≠ field_num``
  (no crossover at all when ``D ≥ F``).
- The reference mutates its parents in place (``origin = self.cands[i]``), so parents,
  their crossover children and even the recorded best candidate change under it; children
  here are copies. Its mutation draws dims ``2..D`` only; here any allowed dim.
- The reference ignores memory; here the budget is enforced as above, from above (repair,
  raised thresholds) and from below (``fill_budget``). Why the fill is the default: the
  thresholds' equilibrium depends on ``alpha`` and the data, not on the budget, so the same
  supernet serves every budget; on the 200k-row synthetic sweep at 10x one seed's supernet
  kept 402 of 11,040 rows, 46% of the budget, with ten fields emptied. Without the fill a
  "2x" run would be compared at whatever ratio the thresholds reached.
- Tables train with row-wise Adagrad (every method here does) instead of the reference's
  Adam with weight decay; the tables are plain fp32 buffers with a sparse row optimizer
  (fbgemm's fused kernels cannot carry the straight-through gradient), so training is
  single-process.
- Defaults ``alpha=2e-3``, ``threshold_lr=3.0`` suit this project's tables (row-wise
  Adagrad moves every trained row's L1 norm to ~0.3-3 within an epoch): the thresholds rise
  ~0.006 per step from the penalty while the data loss, which only a small ``alpha`` leaves
  comparable, holds them down per field. The reference's ``alpha=3e-4``,
  ``threshold_lr=3e-4`` (64-dim xavier tables, Adam, 30 epochs) are one option away.
- Pruned rows: ``pruned_rows="zero"`` (the default, as the reference's default
  ``mode_oov='zero'``, the setting of the paper's results) reads zeros;
  ``pruned_rows="field_vector"`` (the reference's ``mode_oov='oov'``) gives each field one
  learned vector that its pruned ids read instead, in the supernet and in the retrain, cut
  to the field's dim like its rows. It starts at zero (pruned rows read zeros until it
  learns; the reference draws it xavier-uniform) and trains with the network's Adam; the
  retrain rewinds it to zero with the rest, so the served vector is the retrain's. In the
  supernet a row reads ``m·e + (1 − m)·v_f`` (``m`` the step), so the straight-through
  gradient ``(e − v_f)·∂L/∂out·ste'`` tells the threshold whether a row beats its field's
  vector; the reference's ``torch.where(m > 0, e, v_f)`` passes no data gradient to the
  thresholds at all in that mode. Served as one more row of the field's table that pruned
  ids remap to (instead of ``-1``), counted in ``serve_bytes``; a field that loses every row
  keeps just that row and its remap.

Example::

    layer = build_compressor("optembed", features, dim=16, budget="5x")
    layer = build_compressor("optembed", features, dim=16, budget="10x", storage="int8")
    layer = build_compressor("optembed", features, dim=16, budget="2x", search_dims=False)  # -E
    layer = build_compressor("optembed", features, dim=16, budget="5x", pruned_rows="field_vector")
"""

from __future__ import annotations

import logging
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
from compressors.core.registry import register
from compressors.core.storage import check_dtype, optimizer_state_bytes
from compressors.pruning.common import (
    EntryTable,
    dim_choices,
    export_pruned,
    refuse_distributed,
    row_optimizer,
    row_plan,
)

if TYPE_CHECKING:
    from compressors.core.base import StageContext

log = logging.getLogger(__name__)

QUANTILE_STEPS = 1000
PRUNED_ROWS = ("zero", "field_vector")


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

    name = "optembed"
    default_optimizer = "adam"  # the paper's; its criteria need it (docs/methods)
    option_help = {
        "optimizer": "optimizer of the table rows: sgd, adagrad, rowwise_adagrad or adam "
        "(None: the run's --table-optimizer, as every method's tables)",
        "storage": "serving dtype of the kept rows (fp32, fp16, int8, int4, int2)",
        "prune_rows": "learn per-field row thresholds (False: OptEmbed-D, dims only)",
        "search_dims": "search per-field dims by evolution (False: OptEmbed-E, rows only)",
        "alpha": "weight of the threshold regulariser α·Σ exp(−t_f) (reference 3e-4)",
        "threshold_lr": "SGD learning rate of the thresholds (reference 3e-4)",
        "generations": "generations of the evolutionary search (reference 30)",
        "mutations": "children by mutation per generation (reference 10)",
        "crossovers": "children by crossover over fields per generation (reference 10)",
        "parents": "top candidates kept as parents each generation",
        "mutation_prob": "per-field probability that a mutation redraws its dim (reference 0.1)",
        "search_batches": "validation batches scored per candidate (None: the whole split)",
        "rewind": "retrain from the initial weights (False: from the supernet's)",
        "pruned_rows": "what pruned ids read: 'zero' (reference default) or 'field_vector' "
        "(one learned vector per field, served as an extra row)",
        "fill_budget": "after the search, give unused budget back to the supernet's best pruned "
        "rows (False: the paper's, the supernet alone decides the rows)",
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
        alpha: float = 2e-3,
        threshold_lr: float = 3.0,
        generations: int = 30,
        mutations: int = 10,
        crossovers: int = 10,
        parents: int = 10,
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
        if generations < 1 or mutations + crossovers < 1 or parents < 2:
            raise ValueError("optembed: needs generations >= 1, a population and parents >= 2")
        if not 0.0 <= mutation_prob <= 1.0:
            raise ValueError(f"optembed: mutation_prob must lie in [0, 1], got {mutation_prob}")
        self.storage = storage
        self.prune_rows = prune_rows
        self.search_dims = search_dims
        self.alpha = alpha
        self.threshold_lr = threshold_lr
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
        x = weight.abs().sum(1) - self.threshold[self.table.field_of(rows)]
        return self._read_rows(rows, weight, LongTailStep.apply(x))

    def _masked_rows(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._read_rows(rows, weight, self.row_mask[rows].to(weight.dtype))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if bool(self.frozen):
            out = self.table(features, self._masked_rows)
            cols = torch.arange(self.dim)
            return out * (cols < self.dims.unsqueeze(1)).to(out.dtype)  # [F, D] dim masks
        out = self.table(features, self._supernet_rows)
        if self.training and self.search_dims:
            # A uniformly drawn prefix 1..D per (sample, field): every dim choice trains.
            keep = torch.randint(1, self.dim + 1, out.shape[:2]).unsqueeze(2)
            out = out * (torch.arange(self.dim) < keep).to(out.dtype)
        return out

    def penalty(self) -> torch.Tensor:
        if not self.prune_rows or bool(self.frozen):
            return torch.zeros(())
        return self.alpha * torch.exp(-self.threshold).sum()

    def optimizer_groups(self) -> list[dict[str, Any]]:
        if not self.prune_rows:
            return []
        return [{"params": [self.threshold], "optimizer": "sgd", "lr": self.threshold_lr}]

    def rewind_keep(self) -> list[str]:
        return ["threshold", "row_mask", "dims", "frozen", "thresholds_raised", "supernet_kept"]

    # ---------------------------------------------------------------- stages
    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        refuse_distributed(self.name)

    @torch.no_grad()
    def current_row_mask(self) -> torch.Tensor:
        """The rows kept now: the frozen mask, or the supernet's hard step."""
        if bool(self.frozen) or not self.prune_rows:
            return self.row_mask.clone()
        fields = self.table.field_of(torch.arange(self.table.rows))
        return self.table.row_norms() - self.threshold.detach()[fields] > 0

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
            state = {"generation": 0, "population": [], "scores": [], "best": [], "best_auc": -1.0}
        if not self.search_dims:
            self.dims.fill_(self.dim)
        else:
            self._search(ctx, state)
        self._fill_rows()

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
        norms = self.table.row_norms()
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

    @torch.no_grad()
    def _fill_rows(self) -> int:
        """Gives budget the mask leaves unused back to pruned rows, the supernet's best first
        (``fill_budget``); returns how many rows it added. Idempotent: a resumed stage that
        calls it again finds nothing more that fits."""
        if not (self.prune_rows and self.fill_budget):
            return 0
        dims = self.dims.tolist()
        kept = self.kept_per_field()
        plans = self.plans(dims, kept)
        field_bytes = [p.serve_bytes(self.storage) for p in plans]
        spare = self.budget_bytes - sum(field_bytes)
        fields = self.table.field_of(torch.arange(self.table.rows))
        score = self.table.row_norms() - self.threshold.detach()[fields]
        pruned = torch.nonzero(~self.row_mask).squeeze(1)
        order = pruned[torch.argsort(score[pruned], descending=True, stable=True)].tolist()
        field_list = fields.tolist()
        added = []

        def cost(f: int, k: int) -> int:
            spec = self.features[f]
            plan = row_plan(spec.name, spec.cardinality, k, dims[f], self.field_vector)
            return plan.serve_bytes(self.storage)

        def step(g: int) -> int:  # bytes one more row of field g costs now
            if kept[g] >= self.features[g].cardinality:
                return self.budget_bytes + 1
            return cost(g, kept[g] + 1) - field_bytes[g]

        steps = [step(g) for g in range(len(kept))]
        cheapest = min(steps)
        for row in order:
            if cheapest > spare:
                break  # not even the cheapest next row of any field fits
            f = field_list[row]
            if steps[f] > spare:
                continue
            spare -= steps[f]
            field_bytes[f] += steps[f]
            kept[f] += 1
            before, steps[f] = steps[f], step(f)
            if steps[f] != before:  # a form changed (remap width, dense): rare
                cheapest = min(steps)
            added.append(row)
        if added:
            self.row_mask[torch.tensor(added)] = True
            log.info(
                "%s: filled the budget with %d of the supernet's pruned rows (best score first)",
                self.name,
                len(added),
            )
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
                torch.as_tensor(spec.frequencies, dtype=torch.float32) + 1.0
                if spec.frequencies is not None
                else torch.ones(spec.cardinality)
            )
            mass[f] = (freq.unsqueeze(1) * rows).sum(0).double().numpy()
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

    # ---------------------------------------------------------------- evolution
    def _random_dim(self, gen: torch.Generator) -> int:
        return self.choices[int(torch.randint(len(self.choices), (1,), generator=gen))]

    @torch.no_grad()
    def fitness(self, dims: Sequence[int], ctx: StageContext) -> float:
        saved = self.dims.clone()
        self.dims.copy_(torch.tensor(list(dims)))
        try:
            return float(ctx.evaluate("valid", max_batches=self.search_batches)["auc"])
        finally:
            self.dims.copy_(saved)

    def _search(self, ctx: StageContext, state: dict[str, Any]) -> None:
        gen = ctx.rng()
        if "rng" in state:
            gen.set_state(state["rng"])
        kept = self.kept_per_field()
        mass = self._column_mass()
        population = [list(c) for c in state["population"]]
        if not population:
            size = self.mutations + self.crossovers
            population = [
                self.repair([self._random_dim(gen) for _ in self.features], kept, mass)
                for _ in range(size)
            ]
        cache = {tuple(c): s for c, s in state.get("cache", [])}
        best, best_auc = list(state["best"]), float(state["best_auc"])
        bar = ctx.progress(self.generations, "search")
        bar.update(state["generation"])
        for generation in range(state["generation"], self.generations):
            scores = []
            for cand in population:
                key = tuple(cand)
                if key not in cache:
                    cache[key] = self.fitness(cand, ctx)
                scores.append(cache[key])
            order = sorted(range(len(population)), key=lambda i: -scores[i])
            ranked = [population[i] for i in order]
            if scores[order[0]] > best_auc:
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
            "supernet_kept_rows": dict(
                zip(self.feature_names, self.supernet_kept.tolist(), strict=True)
            ),
        }
