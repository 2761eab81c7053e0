"""``dnis`` — Differentiable Neural Input Search (Cheng, Shen, Huang, arXiv 2006.04466;
official code SJTU-DMTai/AutoSrh, ``main_nas.py`` with ``--search_space free``).

Values are cut into frequency blocks (per field, or globally as the official code); a
soft-selection matrix ``α ∈ [0,1]^{S×D}`` scales each embedding by its block's row,
``ẽ_v = e_v ⊙ α[block(v)]``. Stages: ``warmup``; ``search`` (bilevel: training batches
update the tables, validation batches update α on loss + ``l1``·‖α‖₁, gradient normalised per
block, clipped to [0, 1]); ``prune`` (α folded into the table, then the lowest-scoring entries
removed until the exact export fits the budget); ``finetune`` with the mask fixed. Export:
per (field, block), the surviving columns as a dense sub-table or CSR, whichever is smaller.
How it works in detail, the reasons and the figures: ``docs/methods/dnis.md``.

Options: ``blocks``, ``num_blocks``, ``shared_alpha``, ``oov_block``, ``l1``, ``alpha_lr``,
``grad_norm``, ``train_network``, ``prune_score``, ``storage``, ``search_holdout``,
``warmup_epochs``, ``search_epochs``, ``finetune_epochs``.

Deviations from the paper (reasons and figures: ``docs/methods/dnis.md``):

- ``blocks="field"`` (per-field blocks, α per field) is the default by measurement; the
  official layout is ``blocks="global"``, its blocks cut at equal train mass rather than the
  official code's hand-set sizes.
- The OOV id is a block of its own (``oov_block``); the paper has no OOV id.
- Tables are the run's fused tables (Adam under ``--table-optimizer auto``, the official
  code's optimiser); under row-wise Adagrad the per-row accumulator still sees the masked
  entries' gradients.

Example::

    layer = build_compressor("dnis", features, dim=16, budget="10x")
    layer.stages          # warmup, search (bilevel), prune, finetune
    layer.kept_dims()     # after prune: surviving columns per field and block
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    StageContext,
    full_bytes,
)
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.collective import average
from compressors.core.csr import column_bytes, column_dtype
from compressors.core.registry import register
from compressors.core.storage import (
    Lookup,
    TableSpec,
    TrainTables,
    check_dtype,
    optimizer_state_bytes,
    pack_rows,
)
from compressors.dimension.blocks import (
    BlockMap,
    block_ranges,
    frequency_blocks,
    global_frequency_blocks,
    router_bytes,
)
from compressors.dimension.mixed import (
    MIXED_KIND,
    csr_bytes,
    csr_value_dtype,
    dense_bytes,
    mixed_config,
    pack_csr_block,
    padded_width,
)

DEFAULT_BLOCKS = 6
PRUNE_SCORES = ("folded", "alpha")
BLOCKS = ("field", "global")


def dnis_bounds(
    features: Sequence[FeatureSpec], num_blocks: int, oov_block: bool, blocks: str = "field"
) -> tuple[list[list[int]], list[list[int]]]:
    """Per field, its blocks' id boundaries and each block's index: within the field
    (``field``) or among the global blocks (``global``)."""
    if blocks == "global":
        return global_frequency_blocks(features, num_blocks, oov_block)
    bounds = [frequency_blocks(f, num_blocks, oov_block) for f in features]
    return bounds, [list(range(len(b) - 1)) for b in bounds]


def alpha_rows(block_index: Sequence[Sequence[int]], shared: bool) -> int:
    """Rows of α: one per block index when shared by the fields, else one per lookup."""
    flat = [b for field in block_index for b in field]
    return max(flat) + 1 if shared else len(flat)


def dnis_train_bytes(rows: int, dim: int, alpha_rows: int, optimizer: str) -> int:
    """The full fp32 table with its fused optimizer state, α (fp32) and the bool mask."""
    return (
        rows * dim * 4
        + optimizer_state_bytes(rows, dim, optimizer)
        + alpha_rows * dim * 4
        + rows * dim
    )


@dataclass(frozen=True)
class BlockForm:
    """How one (field, block) is exported: form, its bytes, and the columns it keeps."""

    form: str
    nbytes: int
    columns: int
    nnz: int


def choose_form(rows: int, columns: int, nnz: int, dim: int, storage: str) -> BlockForm:
    """The smaller exact form of a block with ``columns`` surviving columns, ``nnz`` entries.

    Dense wins ties (it is served by fbgemm)."""
    if nnz == 0:
        return BlockForm("none", 0, 0, 0)
    width = padded_width(columns, storage)
    if width >= dim:
        dense = BlockForm("full", dense_bytes(rows, dim, storage), dim, nnz)
    else:
        extra = width * column_bytes(dim)
        dense = BlockForm("columns", dense_bytes(rows, width, storage) + extra, width, nnz)
    if csr_value_dtype(storage) is None:
        return dense
    sparse = csr_bytes(rows, nnz, dim, storage)
    return dense if dense.nbytes <= sparse else BlockForm("csr", sparse, columns, nnz)


class PruneProfile:
    """Per (field, block) magnitudes, sorted once, so the export bytes of any threshold cost
    a few searches (the binary search evaluates ~log2(N·D) thresholds)."""

    def __init__(self, blocks: list[torch.Tensor], dim: int, storage: str) -> None:
        self.dim, self.storage = dim, storage
        self.rows = [len(b) for b in blocks]
        self.sorted = [b.reshape(-1).sort().values for b in blocks]
        self.column_max = torch.stack(
            [b.amax(0) if len(b) else b.new_full((dim,), -1.0) for b in blocks]
        )

    def largest(self) -> float:
        return float(self.column_max.max())

    def forms(self, threshold: float) -> list[BlockForm]:
        columns = (self.column_max > threshold).sum(1).tolist()
        t = torch.tensor([threshold], device=self.column_max.device)
        forms = []
        for rows, values, cols in zip(self.rows, self.sorted, columns, strict=True):
            nnz = len(values) - int(torch.searchsorted(values, t, right=True))
            forms.append(choose_form(rows, cols, nnz, self.dim, self.storage))
        return forms

    def nbytes(self, threshold: float) -> int:
        return sum(form.nbytes for form in self.forms(threshold))


@register
class DNIS(SearchedBytes, Compressor):
    """Frequency-block soft selection α searched on validation data, then magnitude pruning."""

    data_parallel = True  # replicated state stays identical across ranks (base class)

    name = "dnis"
    default_optimizer = "adam"  # the paper's; its criteria need it (docs/methods)
    learns_on_validation = True  # α (search stage)
    option_help = {
        "num_blocks": "frequency blocks (equal train-frequency mass) per field, or in all",
        "blocks": "field: each field's values cut into blocks; global: all fields' values "
        "ranked together and cut into blocks (the official code's)",
        "shared_alpha": "one α for every field instead of one per field (None: shared with "
        "global blocks, per field with field blocks)",
        "l1": "λ of the L1 penalty on α during the search",
        "alpha_lr": "SGD learning rate of α (validation batches)",
        "grad_norm": "divide α's gradient per block by its mean absolute value",
        "train_network": "train the dense network during the search (the paper freezes it)",
        "warmup_epochs": "epochs of the warm-up stage (None: the run's)",
        "search_epochs": "epochs of the search stage (None: the run's)",
        "finetune_epochs": "epochs of the fine-tuning stage (None: the run's)",
        "storage": "serving dtype of the surviving dense sub-tables (CSR only at fp32/fp16)",
        "oov_block": "the OOV id 0 is a block of its own, outside the head block",
        "prune_score": "folded: prune the smallest |e ⊙ α| (the paper); alpha: drop whole "
        "(block, dim) columns in increasing α",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        num_blocks: int = DEFAULT_BLOCKS,
        blocks: str = "field",
        shared_alpha: bool | None = None,
        l1: float = 1e-5,
        alpha_lr: float = 0.01,
        grad_norm: bool = True,
        train_network: bool = False,
        warmup_epochs: float | None = None,
        search_epochs: float | None = None,
        finetune_epochs: float | None = None,
        storage: str = "fp32",
        oov_block: bool = True,
        prune_score: str = "folded",
        init_scale: float = 0.01,
        search_holdout: float = 0.0,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        self.hold_out(search_holdout)
        check_dtype(storage, dim)
        if l1 < 0 or alpha_lr <= 0:
            raise ValueError(f"dnis: l1 must be >= 0 and alpha_lr > 0, got {l1}, {alpha_lr}")
        if prune_score not in PRUNE_SCORES:
            raise ValueError(
                f"dnis: prune_score must be one of {PRUNE_SCORES}, got {prune_score!r}"
            )
        if blocks not in BLOCKS:
            raise ValueError(f"dnis: blocks must be one of {BLOCKS}, got {blocks!r}")
        if shared_alpha is None:
            shared_alpha = blocks == "global"
        self.storage, self.num_blocks, self.shared_alpha = storage, num_blocks, shared_alpha
        self.blocks = blocks
        self.oov_block, self.prune_score = oov_block, prune_score
        self.l1, self.alpha_lr, self.grad_norm = l1, alpha_lr, grad_norm
        self.train_network = train_network
        self.stages = (
            Stage("warmup", epochs=warmup_epochs),
            Stage("search", epochs=search_epochs, bilevel=True, dense=train_network, **SCHEDULED),
            Stage("prune", trains=False),
            Stage("finetune", epochs=finetune_epochs),
        )
        names = self.feature_names
        self.bounds, self.block_index = dnis_bounds(features, num_blocks, oov_block, blocks)
        self.router = BlockMap(names, self.bounds, relative=False)
        tables = [TableSpec(f"t_{f.name}", f.cardinality, dim) for f in features]
        fields = self.router.lookup_fields
        lookups = [
            Lookup(key, f"t_{names[f]}", field=f)
            for key, f in zip(self.router.lookup_keys, fields, strict=True)
        ]
        self.table_specs = tables
        self.tables = TrainTables(tables, lookups, init_scale=init_scale)
        index = [b for field in self.block_index for b in field]
        self.register_buffer("lookup_field", torch.tensor(fields), persistent=False)
        self.register_buffer("lookup_block", torch.tensor(index), persistent=False)
        self.alpha = nn.Parameter(torch.ones(alpha_rows(self.block_index, shared_alpha), dim))
        if grad_norm:
            self.alpha.register_hook(normalise_per_block)
        for i, f in enumerate(features):
            self.register_buffer(f"mask{i}", torch.ones(f.cardinality, dim, dtype=torch.bool))
        self.register_buffer("pruned", torch.tensor(False))
        # α as the search left it (folded into the tables by the prune): for reports.
        self.register_buffer("searched_alpha", torch.ones(len(index), dim))
        self._searching = False
        floor = router_bytes(self.bounds)
        if floor > budget_bytes:
            raise BudgetError(
                f"dnis: the frequency blocks' bounds alone need {describe_bytes(floor)} but the "
                f"budget is {describe_bytes(budget_bytes)}"
            )

    # ---------------------------------------------------------------- plan (arithmetic)
    @classmethod
    def solve_budget(
        cls, features: Sequence[FeatureSpec], dim: int, budget_bytes: int, **options: Any
    ) -> dict[str, Any]:
        """The prune keeps the exported bytes at most the budget (the exact bytes depend on
        the searched weights); the block bounds are the floor. Training holds the full table."""
        blocks = options.get("blocks", "field")
        bounds, block_index = dnis_bounds(
            features,
            options.get("num_blocks", DEFAULT_BLOCKS),
            options.get("oov_block", True),
            blocks,
        )
        lookups = sum(len(b) - 1 for b in bounds)
        shared = options.get("shared_alpha")
        rows_of_alpha = alpha_rows(block_index, blocks == "global" if shared is None else shared)
        optimizer = options.get("table_optimizer", "rowwise_adagrad")
        rows = sum(f.cardinality for f in features)
        floor = router_bytes(bounds)
        return {
            "method": cls.name,
            "feasible": floor <= budget_bytes,
            "serve_bytes_max": budget_bytes,
            "floor_bytes": floor,
            "train_bytes": dnis_train_bytes(rows, dim, rows_of_alpha, optimizer),
            "full_bytes": full_bytes(features, dim),
            "lookups": lookups,
        }

    def plan_context(self) -> dict[str, Any]:
        return {"table_optimizer": self.table_optimizer}

    # ---------------------------------------------------------------- forward
    def lookup_alpha(self) -> torch.Tensor:
        """α's row of every (field, block) lookup: ``[L, dim]``."""
        return self.alpha[self.lookup_block] if self.shared_alpha else self.alpha

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.tables(self.router(features))
        batch = pooled.shape[0]
        scaled = pooled.view(batch, -1, self.dim) * self.lookup_alpha()
        out = scaled.new_zeros(batch, self.num_features, self.dim)
        return out.index_add(1, self.lookup_field, scaled)

    def penalty(self) -> torch.Tensor:
        if not self._searching or self.l1 == 0:
            return torch.zeros((), device=self.alpha.device)
        return self.l1 * self.alpha.abs().sum()

    def architecture_state(self) -> list[str]:
        return ["alpha", "mask", "pruned", "searched_alpha"]

    def optimizer_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.alpha], "optimizer": "sgd", "lr": self.alpha_lr, "role": "valid"}]

    # ---------------------------------------------------------------- stages
    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        self._searching = stage.name == "search"

    @torch.no_grad()
    def after_step(self, ctx: StageContext) -> None:
        if ctx.stage.name == "search":
            self.alpha.clamp_(0.0, 1.0)
        elif bool(self.pruned):
            self.apply_mask()

    def on_stage_end(self, stage: Stage, ctx: StageContext) -> None:
        self._searching = False

    @torch.no_grad()
    def run_stage(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name != "prune":
            raise NotImplementedError(f"dnis: no stage {stage.name!r}")
        self.prune()

    @torch.no_grad()
    def prune(self) -> float:
        """Folds α into the tables and keeps the best-scoring entries that fit the budget.

        Idempotent: after folding α is 1 and the pruned entries are zero, and what survived
        fits, so a repeated prune (a resumed stage) keeps the same entries."""
        weights = self._field_weights()
        alpha = self.lookup_alpha().detach().clone()
        if not bool(self.pruned):
            self.searched_alpha.copy_(alpha)
        for index, (f, start, stop) in enumerate(self._lookup_ranges()):
            weights[f][start:stop] *= alpha[index]
        self.alpha.fill_(1.0)
        scores = self._scores(weights, self.searched_alpha)
        threshold = self._threshold(PruneProfile(scores, self.dim, self.storage))
        for i in range(len(weights)):
            getattr(self, f"mask{i}").zero_()
        for score, (f, start, stop) in zip(scores, self._lookup_ranges(), strict=True):
            getattr(self, f"mask{f}")[start:stop] = score > threshold
        for i, w in enumerate(weights):
            w.mul_(getattr(self, f"mask{i}"))
        self.pruned.fill_(True)
        return threshold

    @torch.no_grad()
    def apply_mask(self) -> None:
        for i, w in enumerate(self._field_weights()):
            w.mul_(getattr(self, f"mask{i}"))

    # ---------------------------------------------------------------- pruning arithmetic
    def _field_weights(self) -> list[torch.Tensor]:
        tables = self.tables.weights()
        return [tables[t.name] for t in self.table_specs]

    def _lookup_ranges(self) -> list[tuple[int, int, int]]:
        return [
            (f, start, stop)
            for f, bounds in enumerate(self.bounds)
            for start, stop in block_ranges(bounds)
        ]

    def _scores(self, folded: list[torch.Tensor], alpha: torch.Tensor) -> list[torch.Tensor]:
        """Per (field, block) lookup, the score of every entry of the folded tables: an entry
        is kept when its score exceeds the threshold.

        ``folded``: ``|e ⊙ α|`` (the paper's magnitude pruning of the merged table).
        ``alpha``: the rank (1, 2, …) of the entry's (block, dim) column when the columns are
        ordered by α (``[lookups, dim]``), ties by the column's mean ``|e ⊙ α|`` per row;
        exact zeros score 0. The threshold then drops whole columns in increasing α."""
        blocks = [folded[f][start:stop] for f, start, stop in self._lookup_ranges()]
        if self.prune_score == "folded" or self._is_pruned():
            return [b.abs() for b in blocks]
        mass = torch.stack([b.abs().mean(0) for b in blocks]).flatten()
        order = torch.argsort(mass, stable=True)
        order = order[torch.argsort(alpha.flatten()[order], stable=True)]
        rank = torch.empty(len(order), device=order.device)
        rank[order] = torch.arange(1, len(order) + 1, dtype=torch.float32, device=order.device)
        rank = rank.view(len(blocks), self.dim)
        return [torch.where(b != 0, rank[i], 0.0) for i, b in enumerate(blocks)]

    def _threshold(self, profile: PruneProfile) -> float:
        """The smallest threshold (keep ``score > t``) whose export fits the budget.

        Bisection over the bit patterns of non-negative float32 thresholds (ordered like the
        floats): exact, in at most 32 evaluations."""
        budget = self.budget_bytes - router_bytes(self.bounds)
        if profile.nbytes(-1.0) <= budget:
            return -1.0
        lo, hi = _float_bits(0.0), _float_bits(profile.largest())  # hi keeps nothing
        if profile.nbytes(0.0) <= budget:
            return 0.0
        while hi - lo > 1:  # bytes(lo) > budget >= bytes(hi)
            mid = (lo + hi) // 2
            if profile.nbytes(_bits_float(mid)) <= budget:
                hi = mid
            else:
                lo = mid
        return _bits_float(hi)

    @torch.no_grad()
    def _effective(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[BlockForm]]:
        """(folded weights per field, kept entries per lookup, block forms): the masked state
        after pruning, or what pruning the current weights would keep (weights untouched)."""
        weights = [w.detach() for w in self._field_weights()]
        alpha = self.lookup_alpha().detach()
        if self._is_pruned():
            weights = [w * getattr(self, f"mask{i}") for i, w in enumerate(weights)]
        else:
            weights = [w.clone() for w in weights]
            for index, (f, start, stop) in enumerate(self._lookup_ranges()):
                weights[f][start:stop] *= alpha[index]
        scores = self._scores(weights, alpha)
        profile = PruneProfile(scores, self.dim, self.storage)
        threshold = 0.0 if self._is_pruned() else self._threshold(profile)
        return weights, [s > threshold for s in scores], profile.forms(threshold)

    # ---------------------------------------------------------------- accounting and export
    def _is_pruned(self) -> bool:
        return self.pruned.device.type != "meta" and bool(self.pruned)

    def memory(self) -> MemoryReport:
        """Exact bytes once pruned; before, the budget as the bound the prune stage keeps."""
        rows = sum(f.cardinality for f in self.features)
        train = dnis_train_bytes(rows, self.dim, len(self.alpha), self.table_optimizer)
        if not self._is_pruned():
            return self.bound_memory(train, "the prune stage")
        _, _, forms = self._effective()
        parts = {"index_map.bounds": router_bytes(self.bounds)}
        for key, form in zip(self.router.lookup_keys, forms, strict=True):
            if form.nbytes:
                parts[f"{form.form}.{key}"] = form.nbytes
        return MemoryReport(
            serve_bytes=sum(parts.values()),
            train_bytes=train,
            full_bytes=self.full_bytes,
            parts=parts,
        )

    @torch.no_grad()
    def export(self) -> ExportedEmbedding:
        weights, kept_entries, forms = self._effective()
        router = BlockMap(self.feature_names, self.bounds, relative=True)
        tensors = {f"index_map.{k}": v for k, v in router.tensors().items()}
        specs = []
        for key, (f, start, stop), kept, form in zip(
            self.router.lookup_keys, self._lookup_ranges(), kept_entries, forms, strict=True
        ):
            block, kept = (weights[f][start:stop] * kept).cpu(), kept.cpu()  # packed on the host
            spec = {
                "key": key,
                "field": f,
                "form": form.form,
                "rows": stop - start,
                "width": form.columns,
                "dtype": self.storage,
            }
            specs.append(spec)
            if form.form == "full":
                tensors[f"table.{key}"] = pack_rows(block, self.storage)
            elif form.form == "columns":
                cols = _padded_columns(kept.any(0), form.columns)
                tensors[f"table.{key}"] = pack_rows(block[:, cols], self.storage)
                tensors[f"columns.{key}"] = cols.to(column_dtype(self.dim))
            elif form.form == "csr":
                packed = pack_csr_block(kept, block, self.storage)
                tensors.update({f"{name}.{key}": v for name, v in packed.items()})
        return ExportedEmbedding(
            kind=MIXED_KIND,
            config=mixed_config(self.name, self.dim, router, specs, {"storage": self.storage}),
            tensors=tensors,
        )

    # ---------------------------------------------------------------- reports
    def kept_dims(self) -> dict[str, list[dict[str, Any]]]:
        """Per field and block: rows, surviving columns, mean surviving entries per row, form
        (with ``oov_block`` a field's first block is the OOV id alone)."""
        _, kept_entries, forms = self._effective()
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in self.feature_names}
        for (f, start, stop), kept, form in zip(
            self._lookup_ranges(), kept_entries, forms, strict=True
        ):
            out[self.feature_names[f]].append(
                {
                    "ids": [start, stop],
                    "columns": int(kept.any(0).sum()),
                    "entries_per_row": float(kept.sum(1).float().mean()),
                    "form": form.form,
                }
            )
        return out

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "num_blocks": self.num_blocks,
            "blocks": self.blocks,
            "shared_alpha": self.shared_alpha,
            "l1": self.l1,
            "alpha_lr": self.alpha_lr,
            "grad_norm": self.grad_norm,
            "train_network": self.train_network,
            "oov_block": self.oov_block,
            "prune_score": self.prune_score,
            "search_holdout": self.search_holdout,
            "bounds": dict(zip(self.feature_names, self.bounds, strict=True)),
        }


def normalise_per_block(grad: torch.Tensor) -> torch.Tensor:
    """α's gradient divided, row by row (per frequency block), by its mean absolute value
    (of the global batch's gradient under torchrun: the ranks' are averaged first, as the
    normalisation is not linear)."""
    grad = average(grad)
    return grad / (grad.abs().mean(dim=-1, keepdim=True) + 1e-8)


def _float_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32))


def _bits_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _padded_columns(any_kept: torch.Tensor, width: int) -> torch.Tensor:
    """The surviving columns, padded with the first unused ones to ``width`` (byte packing)."""
    cols = any_kept.nonzero().view(-1)
    if len(cols) < width:
        spare = (~any_kept).nonzero().view(-1)[: width - len(cols)]
        cols = torch.sort(torch.cat([cols, spare])).values
    return cols
