"""``autodim`` — automated embedding dimension search (Zhao et al., "AutoDim: Field-aware
Embedding Dimension Search in Recommender Systems", WWW 2021).

**Search** (stage ``search``, bilevel). Each field ``f`` has one ``dim``-wide table; candidate
dims ``{2, 4, 8, …, dim}`` read its first ``d_k`` columns (the paper's weight-sharing
variant), each candidate has its own linear transform ``d_k → dim`` followed by batch
normalisation (the paper's magnitude alignment), and the field's embedding is their mixture
weighted by a Gumbel-softmax over architecture weights ``a_f`` (plain softmax in eval mode).
The temperature anneals linearly from 1 to ``min_temperature`` (0.01, the paper's floor) over
the search stage, reaching the floor at its last step (``anneal=None``, the default); the
paper's ``τ = max(0.01, 1 − 5e-5·step)`` (``anneal=5e-5``) needs 19,800 steps to get there and
stays above 0.95 over a search of ~900 steps, a mixture that never sharpens towards the one
candidate the choice then keeps. Training batches update tables, transforms and network;
validation batches update ``a`` (Adam, DARTS first order).
``search_holdout`` (default 0: the validation split, as the paper) takes ``a``'s batches from
that share of the training split instead, which no stage then trains on (see ``dnis``).

**Choice and retrain** (stage ``retrain``, after a rebuild). Each field takes its argmax
dim. The paper leaves memory unbounded; here the choice must fit the budget: while the
exact serving bytes exceed it, the field whose next lower candidate loses the least
architecture probability per byte saved steps down (a greedy repair, like OptEmbed's). The
model is then rebuilt with a ``d_f``-wide table per field and a ``dim × d_f`` projection
(none at ``d_f = dim``), freshly initialised as the paper retrains; the dense network keeps
its searched weights (the paper retrains it too — a deviation that saves a rewind of the
network alone). The retrained layout exports as ``mixed_dims`` (fbgemm TBE + projections).

The serving bytes are decided by the choice (:class:`SearchedBytes`): the plan is the budget
as a bound, and so is ``memory()`` before the search ends (labelled); after it, the exact
bytes of the chosen layout. ``train_bytes`` is the search's (its peak).

Options: ``arch_lr``, ``min_temperature``, ``anneal``, ``search_epochs``, ``retrain_epochs``,
``storage``, ``search_holdout``.

Deviations from the paper:

- The temperature anneals over the search stage (above); ``anneal=5e-5`` is the paper's.
- The choice is repaired to fit the budget (the paper's memory is unbounded).
- The dense network keeps its searched weights for the retrain (the paper retrains it).
- Each candidate's normalisation has no affine of its own (as the reference code); the field's
  mixture is scaled and shifted by parameters its candidates share, the scale starting at the
  tables' init scale (why: ``docs/methods/autodim.md``).

Notes and measured figures (the planted-signal tests, the anneal): ``docs/methods/autodim.md``.

Example::

    layer = build_compressor("autodim", features, dim=16, budget="10x")
    layer.stages                          # search (bilevel, rebuilds), retrain
    layer.hyperparameters()["dims"]       # after the search: the chosen dim per field
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
    StageContext,
    full_bytes,
)
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.collective import batch_norm
from compressors.core.layout import DirectMap
from compressors.core.registry import register
from compressors.core.storage import Lookup, TableSpec, TrainTables, check_dtype
from compressors.dimension.mde import mde_train_bytes
from compressors.dimension.mixed import ProjectedBlocks, padded_width, projected_serve_bytes


def candidate_dims(dim: int, storage: str) -> list[int]:
    """``{2, 4, 8, …} < dim`` plus ``dim`` itself, each packable at ``storage``."""
    out = {padded_width(2**k, storage) for k in range(1, int(math.log2(dim)) + 1) if 2**k < dim}
    return sorted(d for d in out if d < dim) + [dim]


def field_bytes(cardinality: int, width: int, dim: int, storage: str) -> int:
    return projected_serve_bytes([[0, cardinality]], [[width]], dim, storage)


def floor_bytes(features: Sequence[FeatureSpec], dim: int, storage: str) -> int:
    """Every field at the smallest candidate dim: the least the choice can reach."""
    smallest = candidate_dims(dim, storage)[0]
    return sum(field_bytes(f.cardinality, smallest, dim, storage) for f in features)


def search_train_bytes(
    features: Sequence[FeatureSpec], dim: int, storage: str, optimizer: str
) -> int:
    """The search holds the full fp32 tables with their fused optimizer state; every
    candidate's ``dim × dim`` transform, the fields' scales and shifts and the architecture
    weights with Adam's moments; the normalisation's running statistics. It is the peak: the
    retrain's narrower tables and projections are never larger."""
    rows = sum(f.cardinality for f in features)
    fields, k = len(features), len(candidate_dims(dim, storage))
    tables = mde_train_bytes([[0, rows]], [[dim]], dim, optimizer)
    adam = 3 * 4 * (fields * k * dim * dim + 2 * fields * dim + fields * k)
    return tables + adam + 2 * 4 * fields * k * dim


def choose_dims(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    candidates: Sequence[int],
    probabilities: Sequence[Sequence[float]],
    storage: str = "fp32",
) -> list[int]:
    """Argmax dims, repaired to fit ``budget_bytes`` (pure arithmetic; see module docstring)."""
    choice = [max(range(len(p)), key=lambda k, p=p: (p[k], -k)) for p in probabilities]
    cost = [[field_bytes(f.cardinality, d, dim, storage) for d in candidates] for f in features]
    total = sum(c[k] for c, k in zip(cost, choice, strict=True))
    while total > budget_bytes:
        best, best_score = None, math.inf
        for f, k in enumerate(choice):
            if k == 0:
                continue
            saved = cost[f][k] - cost[f][k - 1]
            if saved <= 0:
                continue
            score = (probabilities[f][k] - probabilities[f][k - 1]) / saved
            if score < best_score:
                best, best_score = f, score
        if best is None:
            raise BudgetError(
                f"autodim: even {candidates[0]}-dim fields need {describe_bytes(total)} but "
                f"the budget is {describe_bytes(budget_bytes)}"
            )
        total -= cost[best][choice[best]] - cost[best][choice[best] - 1]
        choice[best] -= 1
    return [candidates[k] for k in choice]


@register
class AutoDim(SearchedBytes, Compressor):
    """Per-field dimension search by Gumbel-softmax mixtures, then a budgeted retrain."""

    data_parallel = True  # replicated state stays identical across ranks (base class)

    name = "autodim"
    learns_on_validation = True  # the architecture weights (search stage)
    option_help = {
        "arch_lr": "Adam learning rate of the architecture weights (validation batches)",
        "search_epochs": "epochs of the search stage (None: the run's)",
        "retrain_epochs": "epochs of the retrain stage (None: the run's)",
        "min_temperature": "floor of the annealed Gumbel-softmax temperature",
        "anneal": "None: τ falls linearly from 1 to min_temperature over the search stage; a "
        "number: the paper's τ = max(min_temperature, 1 - anneal·step) (paper: 5e-5)",
        "storage": "serving dtype of the retrained tables",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        arch_lr: float = 1e-3,
        search_epochs: float | None = None,
        retrain_epochs: float | None = None,
        min_temperature: float = 0.01,
        anneal: float | None = None,
        storage: str = "fp32",
        init_scale: float = 0.01,
        search_holdout: float = 0.0,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        check_dtype(storage, dim)
        self.hold_out(search_holdout)
        self.storage, self.arch_lr, self.init_scale = storage, arch_lr, init_scale
        self.min_temperature, self.anneal = min_temperature, anneal
        self.stages = (
            Stage("search", epochs=search_epochs, bilevel=True, rebuilds=True, **SCHEDULED),
            Stage("retrain", epochs=retrain_epochs),
        )
        self.candidates = candidate_dims(dim, storage)
        self.check_budget(
            floor_bytes(features, dim, storage), f"every field at {self.candidates[0]} dims"
        )
        names = self.feature_names
        fields, k = len(features), len(self.candidates)
        self.index_map = DirectMap(names)
        self.tables = TrainTables(
            [TableSpec(f"t_{n}", f.cardinality, dim) for n, f in zip(names, features, strict=True)],
            [Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)],
            init_scale=init_scale,
        )
        bound = torch.tensor([1 / math.sqrt(d) for d in self.candidates]).view(1, k, 1, 1)
        self.transforms = nn.Parameter((torch.rand(fields, k, dim, dim) * 2 - 1) * bound)
        columns = torch.arange(dim).unsqueeze(0) < torch.tensor(self.candidates).unsqueeze(1)
        self.register_buffer("_columns", columns.float().view(1, k, 1, dim), persistent=False)
        # Plain normalisation per candidate (no affine of its own, as the reference code): a
        # learnable per-candidate scale would let a candidate win by magnitude again. The
        # field's scale and shift are shared by its candidates; the scale starts at the
        # tables' init scale, as a plain table's output does. At unit scale every field, the
        # no-signal ones included, adds O(1) random FM interactions the model cannot switch
        # off: the supernet then trains badly and the architecture gradient follows that
        # noise, not the labels (docs/methods/autodim.md).
        self.norm = nn.BatchNorm1d(fields * k * dim, affine=False)
        self.field_scale = nn.Parameter(torch.full((fields, dim), float(init_scale)))
        self.field_shift = nn.Parameter(torch.zeros(fields, dim))
        self.arch = nn.Parameter(torch.zeros(fields, k))
        # softmax(arch) at the search's end: kept through the rebuild (and checkpoints) as the
        # record of what the search preferred before the budget repair.
        self.register_buffer("searched_weights", torch.full((fields, k), 1.0 / k))
        self.temperature = 1.0
        self.dims: list[int] | None = None
        self.blocks: ProjectedBlocks | None = None

    # ---------------------------------------------------------------- plan (arithmetic)
    @classmethod
    def solve_budget(
        cls, features: Sequence[FeatureSpec], dim: int, budget_bytes: int, **options: Any
    ) -> dict[str, Any]:
        """The choice keeps the serving bytes at most the budget (the exact bytes depend on
        the searched dims); every field at the smallest candidate is the floor."""
        storage = options.get("storage", "fp32")
        check_dtype(storage, dim)
        floor = floor_bytes(features, dim, storage)
        optimizer = options.get("table_optimizer", "rowwise_adagrad")
        return {
            "method": cls.name,
            "feasible": floor <= budget_bytes,
            "serve_bytes_max": budget_bytes,
            "floor_bytes": floor,
            "train_bytes": search_train_bytes(features, dim, storage, optimizer),
            "full_bytes": full_bytes(features, dim),
            "candidates": candidate_dims(dim, storage),
        }

    def plan_context(self) -> dict[str, Any]:
        return {"table_optimizer": self.table_optimizer}

    # ---------------------------------------------------------------- search
    def weights(self) -> torch.Tensor:
        """Candidate weights ``[F, K]``: Gumbel-softmax when training, softmax otherwise."""
        if self.training:
            return F.gumbel_softmax(self.arch, tau=self.temperature, hard=False)
        return F.softmax(self.arch, dim=1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if self.blocks is not None:
            return self.blocks(features)
        pooled = self.tables(self.index_map(features))
        batch, fields, k = pooled.shape[0], self.num_features, len(self.candidates)
        e = pooled.view(batch, fields, self.dim)
        h = torch.einsum("bfi,fkoi->bfko", e, self.transforms * self._columns)
        h = batch_norm(self.norm, h.reshape(batch, -1)).view(batch, fields, k, self.dim)
        mixed = (h * self.weights().view(1, fields, k, 1)).sum(2)
        return mixed * self.field_scale + self.field_shift

    def optimizer_groups(self) -> list[dict[str, Any]]:
        if self.blocks is not None:
            return []
        return [{"params": [self.arch], "optimizer": "adam", "lr": self.arch_lr, "role": "valid"}]

    def temperature_at(self, step: int, total: int) -> float:
        """The Gumbel-softmax temperature ``step`` steps into a search of ``total`` steps."""
        if self.anneal is None:
            fall = (1.0 - self.min_temperature) * step / max(total - 1, 1)
        else:
            fall = self.anneal * step
        return max(self.min_temperature, 1.0 - fall)

    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name == "search":
            self.temperature = self.temperature_at(ctx.stage_step, ctx.stage_steps)

    def after_step(self, ctx: StageContext) -> None:
        if ctx.stage.name == "search":  # the next step's temperature
            self.temperature = self.temperature_at(ctx.stage_step + 1, ctx.stage_steps)

    def on_stage_end(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name == "search":
            self.searched_weights.copy_(F.softmax(self.arch.detach(), dim=1))
            self._build_retrain(self.choose())

    def choose(self) -> list[int]:
        """The dims the search picks now: argmax per field, repaired to fit the budget."""
        probabilities = F.softmax(self.arch.detach(), dim=1).tolist()
        return choose_dims(
            self.features,
            self.dim,
            self.budget_bytes,
            self.candidates,
            probabilities,
            self.storage,
        )

    def expected_dims(self) -> dict[str, float]:
        """Per field, the candidate dims weighted by the architecture's softmax (now while
        searching, at the search's end after it): the search's preference, unrepaired."""
        weights = self.searched_weights if self.blocks is not None else F.softmax(self.arch, 1)
        candidates = torch.tensor(self.candidates, dtype=weights.dtype, device=weights.device)
        expected = (weights.detach() * candidates).sum(1).tolist()
        return dict(zip(self.feature_names, expected, strict=True))

    # ---------------------------------------------------------------- retrain
    def _build_retrain(self, dims: Sequence[int]) -> None:
        self.dims = [int(d) for d in dims]
        bounds = [[0, f.cardinality] for f in self.features]
        self.blocks = ProjectedBlocks(
            self.features, self.dim, bounds, [[d] for d in self.dims], self.storage, self.init_scale
        )
        for name in (
            "tables",
            "transforms",
            "norm",
            "field_scale",
            "field_shift",
            "arch",
            "index_map",
        ):
            delattr(self, name)

    def architecture_state(self) -> list[str]:
        return ["arch", "searched_weights"]

    def architecture(self) -> dict[str, Any] | None:
        return None if self.dims is None else {"dims": self.dims}

    def rebuild(self, architecture: dict[str, Any]) -> None:
        if self.blocks is None:
            self._build_retrain(architecture["dims"])

    # ---------------------------------------------------------------- accounting and export
    def memory(self) -> MemoryReport:
        """Exact bytes once the dims are chosen; before, the budget as the bound the choice
        keeps (the dims depend on the search)."""
        train = search_train_bytes(self.features, self.dim, self.storage, self.table_optimizer)
        if self.dims is None:
            return self.bound_memory(train, "the search's choice")
        bounds = [[0, f.cardinality] for f in self.features]
        serve = projected_serve_bytes(bounds, [[d] for d in self.dims], self.dim, self.storage)
        return MemoryReport(
            serve_bytes=serve,
            train_bytes=train,
            full_bytes=self.full_bytes,
            parts={"tables+projections": serve},
        )

    def export(self) -> ExportedEmbedding:
        if self.blocks is None:
            raise RuntimeError(
                "autodim: nothing to export before the search stage ends (it chooses the dims)"
            )
        return self.blocks.export(self.name)

    def hyperparameters(self) -> dict[str, Any]:
        dims = self.dims if self.dims is not None else self.choose()
        return {
            "storage": self.storage,
            "candidates": self.candidates,
            "arch_lr": self.arch_lr,
            "search_holdout": self.search_holdout,
            "dims": dict(zip(self.feature_names, dims, strict=True)),
        }
