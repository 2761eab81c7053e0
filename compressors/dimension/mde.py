"""``mde`` — mixed dimension embeddings (Ginart et al., arXiv 1909.11810; DLRM's
``tricks/md_embedding_bag.py`` and ``md_solver``).

Popular values deserve more dimensions than rare ones. Each field is cut into ``num_blocks``
frequency blocks of equal train-frequency mass (:func:`frequency_blocks`); block ``b`` of
field ``f`` has popularity ``p_fb`` (its mean train count per value, the paper's per-row access
probability up to a constant) and gets

    d_fb = round_pow2( d0 · (p_fb / p_max) ^ α ),   clipped to [min_dim, d0],

the paper's power law (DLRM's ``alpha_power_rule`` with row counts: with equal-mass blocks
``p_fb ∝ 1 / rows_fb``, so ``d ∝ rows^-α``). A block narrower than ``dim`` is projected back by
its own ``dim × d`` matrix (DLRM's ``PrEmbeddingBag``); blocks at ``dim`` are used as is.

Budget: :func:`solve_mde` (pure arithmetic) finds the smallest ``α`` whose exact serving bytes
(sub-tables at the storage dtype, fp32 projections, the block bounds) fit, by bisection, at
base dim ``d0 = dim``; when even ``α → ∞`` does not fit, it halves ``d0``. Rounding to powers of
two is the paper's default (``round_pow2=False`` rounds to integers instead).

Options: ``num_blocks``, ``min_dim``, ``round_pow2``, ``storage``, ``init_scale``
(``option_help`` says each).

Deviations from the paper (and DLRM's ``md_solver``, which gives one dim per table): blocks
are ``num_blocks`` equal-mass frequency ranges within each field; ``α`` (and, when needed,
``d0``) is solved from the budget rather than set by hand.

Example::

    layer = build_compressor("mde", features, dim=16, budget="10x")
    layer.hyperparameters()["alpha"], layer.hyperparameters()["dims"]
    solve_mde(features, 16, 1_000_000)["serve_bytes"]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from compressors.core.base import Compressor, ExportedEmbedding, FeatureSpec, MemoryReport
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.registry import register
from compressors.core.storage import check_dtype, optimizer_state_bytes
from compressors.dimension.blocks import block_ranges, frequency_blocks
from compressors.dimension.mixed import (
    ProjectedBlocks,
    padded_width,
    projected_serve_bytes,
    projection_bytes,
    train_width,
)

DEFAULT_BLOCKS = 6
_ALPHA_MAX = 64.0


def block_popularity(feature: FeatureSpec, bounds: Sequence[int]) -> list[float]:
    """Mean train count per value of each block (1 per value without frequencies)."""
    counts = (
        np.ones(feature.cardinality)
        if feature.frequencies is None
        else np.asarray(feature.frequencies, np.float64)
    )
    return [float(counts[a:b].mean()) for a, b in block_ranges(bounds)]


def power_dims(
    popularity: Sequence[Sequence[float]],
    alpha: float,
    base: int,
    min_dim: int,
    pow2: bool,
    storage: str,
) -> list[list[int]]:
    """The power rule ``d = base · (p / p_max)^α``, rounded and clipped (see module docstring)."""
    top = max(p for field in popularity for p in field) or 1.0
    dims = []
    for field in popularity:
        row = []
        for p in field:
            raw = base * (p / top) ** alpha if p > 0 else 0.0
            if pow2:
                d = 2 ** round(math.log2(raw)) if raw > 0 else 0
            else:
                d = round(raw)
            row.append(padded_width(min(base, max(min_dim, d)), storage))
        dims.append(row)
    return dims


def solve_mde(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    num_blocks: int = DEFAULT_BLOCKS,
    storage: str = "fp32",
    min_dim: int | None = None,
    round_pow2: bool = True,
    table_optimizer: str = "rowwise_adagrad",
) -> dict[str, Any]:
    """MDE's plan for ``budget_bytes``: blocks, per-block dims, ``α``, base dim, exact bytes.

    Pure arithmetic (no tensors). Raises :class:`BudgetError` when no base dim fits.
    """
    check_dtype(storage, dim)
    floor = padded_width(1, storage) if min_dim is None else padded_width(min_dim, storage)
    bounds = [frequency_blocks(f, num_blocks) for f in features]
    popularity = [block_popularity(f, b) for f, b in zip(features, bounds, strict=True)]

    def cost(alpha: float, base: int) -> tuple[int, list[list[int]]]:
        dims = power_dims(popularity, alpha, base, floor, round_pow2, storage)
        return projected_serve_bytes(bounds, dims, dim, storage), dims

    bases = [dim] + [2**k for k in range(int(math.log2(dim)), -1, -1) if 2**k < dim]
    for base in (b for b in bases if b >= floor):
        top_bytes, _ = cost(_ALPHA_MAX, base)
        if top_bytes > budget_bytes:
            continue
        low_bytes, _ = cost(0.0, base)
        if low_bytes <= budget_bytes:
            alpha = 0.0
        else:
            lo, hi = 0.0, _ALPHA_MAX  # cost(lo) > budget >= cost(hi)
            for _ in range(60):
                mid = (lo + hi) / 2
                if cost(mid, base)[0] <= budget_bytes:
                    hi = mid
                else:
                    lo = mid
            alpha = hi
        serve, dims = cost(alpha, base)
        return {
            "bounds": bounds,
            "dims": dims,
            "alpha": alpha,
            "base_dim": base,
            "serve_bytes": serve,
            "train_bytes": mde_train_bytes(bounds, dims, dim, table_optimizer),
        }
    smallest = cost(_ALPHA_MAX, floor)[0]
    full = sum(f.cardinality for f in features) * dim * 4
    raise BudgetError(
        f"mde: even {floor}-dim blocks need {describe_bytes(smallest)} but the budget is "
        f"{describe_bytes(budget_bytes)} ({full / budget_bytes:.1f}x of {describe_bytes(full)})"
    )


def mde_train_bytes(
    bounds: Sequence[Sequence[int]], dims: Sequence[Sequence[int]], dim: int, optimizer: str
) -> int:
    """fp32 sub-tables with their fused optimizer state, projections with Adam's moments."""
    total = 0
    for b, d in zip(bounds, dims, strict=True):
        for (start, stop), width in zip(block_ranges(b), d, strict=True):
            rows = stop - start
            trained = train_width(width)
            total += rows * trained * 4 + optimizer_state_bytes(rows, trained, optimizer)
            total += 3 * projection_bytes(dim, width)
    return total


@register
class MDE(Compressor):
    """Mixed dimensions from the popularity power law; the budget solves ``α`` (or ``d0``)."""

    name = "mde"
    option_help = {
        "num_blocks": "frequency blocks per field (equal train-frequency mass)",
        "min_dim": "smallest block dim (None: 1, or what the storage dtype can pack)",
        "round_pow2": "round dims to powers of two (the paper) instead of integers",
        "storage": "serving dtype of the sub-tables (projections stay fp32)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        num_blocks: int = DEFAULT_BLOCKS,
        min_dim: int | None = None,
        round_pow2: bool = True,
        storage: str = "fp32",
        init_scale: float = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        self.num_blocks, self.storage = num_blocks, storage
        self.solution = solve_mde(
            features, dim, budget_bytes, num_blocks, storage, min_dim, round_pow2
        )
        self.check_budget(self.solution["serve_bytes"], f"the solved dims at {storage}")
        self.blocks = ProjectedBlocks(
            features, dim, self.solution["bounds"], self.solution["dims"], storage, init_scale
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.blocks(features)

    def memory(self) -> MemoryReport:
        serve = self.blocks.serve_bytes()
        return MemoryReport(
            serve_bytes=serve,
            train_bytes=self.blocks.train_bytes(self.table_optimizer),
            full_bytes=self.full_bytes,
            parts={"tables+projections": serve},
        )

    def export(self) -> ExportedEmbedding:
        return self.blocks.export(self.name)

    def hyperparameters(self) -> dict[str, Any]:
        names = self.feature_names
        return {
            "storage": self.storage,
            "num_blocks": self.num_blocks,
            "alpha": self.solution["alpha"],
            "base_dim": self.solution["base_dim"],
            "bounds": dict(zip(names, self.solution["bounds"], strict=True)),
            "dims": dict(zip(names, self.solution["dims"], strict=True)),
        }
