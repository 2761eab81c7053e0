"""``tt`` — TT-Rec: tensor-train cores instead of embedding tables (Yin et al., MLSys 2021).

A field of ``n`` values is viewed as a 3-way tensor (``n <= n1·n2·n3``, ``dim = d1·d2·d3``);
three cores ``G_k ∈ R^{r_{k-1} × n_k × d_k × r_k}`` hold the whole table and the row of
``v = (i1, i2, i3)`` is ``G_1[i1] · G_2[i2] · G_3[i3]``. The budget solves one TT rank ``r``
for every compressed field (the largest ``r <= max_rank`` that fits); fields no larger than
their cores stay plain fp32 tables. ``BudgetError`` below ``min_rank``. How it works in
detail, and the measured figures: ``docs/methods/tt.md``.

Options: ``rank`` (None: solved), ``max_rank``, ``min_rank`` (2: rank 1 is no longer a
tensor train), ``init`` (``gaussian`` | ``approx-normal``), ``init_std``, ``init_scale``,
``lr`` (the cores' Adam learning rate) (``option_help`` says each).

Deviations from the paper (and the reference ``facebookresearch/FBTT-Embedding``):

* Vectorised torch lookups (the reference runs a fused CUDA kernel): the same mathematics in
  another contraction order; slow to look up, as the paper says
  (``python bench.py --only lookup_speed``).
* ``init="gaussian"`` by default, scaled so a reconstructed entry has std ``init_std``; the
  reference's ``approx-normal`` assumes tables of millions of rows and saturates the model
  on smaller fields (one flag away).
* The cores train with their own Adam lr (``lr``, 0.01).

Example::

    layer = build_compressor("tt", features, dim=16, budget="100x")
    layer.hyperparameters()          # {'rank': 10, 'tt_fields': [...], 'table_fields': [...]}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import FLOAT_BYTES, FeatureSpec
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.hybrid import (
    FieldModule,
    HybridMethod,
    HybridServing,
    pool_bags,
    register_field_module,
    take_rows,
)
from compressors.core.registry import register, register_serving
from compressors.core.storage import TableSpec

TT_KIND = "tt"


def factor_rows(n: int) -> tuple[int, int, int]:
    """``(n1, n2, n3)`` with ``n1·n2·n3 >= n``, each near ``n^(1/3)``; ``n2`` the smallest."""
    a = max(1, round(n ** (1 / 3)))
    while a**3 < n:
        a += 1
    rest = -(-n // a)
    b = max(1, math.isqrt(rest - 1) + 1) if rest > 1 else 1
    c = -(-n // (a * b))
    small, middle, large = sorted((a, b, c))
    return middle, small, large


def factor_dim(dim: int) -> tuple[int, int, int]:
    """``(d1, d2, d3)`` with ``d1·d2·d3 == dim``, as balanced as possible; ``d2`` the smallest."""
    best: tuple[int, int, int] | None = None
    for x in range(1, dim + 1):
        for y in range(x, dim + 1):
            if dim % (x * y) or dim // (x * y) < y:
                continue
            z = dim // (x * y)
            if best is None or (z, -x) < (best[2], -best[0]):
                best = (x, y, z)
    assert best is not None
    small, middle, large = best
    return middle, small, large


@dataclass(frozen=True)
class TTShape:
    """The tensor-train view of one field: row factors and dim factors."""

    rows: tuple[int, int, int]
    dims: tuple[int, int, int]

    @classmethod
    def for_field(cls, cardinality: int, dim: int) -> TTShape:
        return cls(factor_rows(cardinality), factor_dim(dim))

    def params(self, rank: int) -> int:
        (n1, n2, n3), (d1, d2, d3) = self.rows, self.dims
        return rank * n1 * d1 + rank * rank * n2 * d2 + rank * n3 * d3

    def nbytes(self, rank: int) -> int:
        return self.params(rank) * FLOAT_BYTES


INITS = ("approx-normal", "gaussian")
_TAIL = 2.0  # approx-normal keeps the standard normal's |x| >= 2


def reversed_truncated_normal(*shape: int) -> torch.Tensor:
    """Standard normals conditioned on ``|x| >= 2`` (the tails only), by inverse CDF."""
    tail = torch.special.ndtr(torch.tensor(-_TAIL, dtype=torch.float64))
    u = torch.rand(*shape, dtype=torch.float64) * tail  # P(X <= -x) = u  ->  x >= 2
    magnitude = -torch.special.ndtri(u.clamp_(min=1e-300))
    sign = torch.randint(0, 2, shape, dtype=torch.float64) * 2 - 1
    return (magnitude * sign).float()


class TTCores(nn.Module):
    """The three cores of one field, stored row-gatherable: ``[n_k, r_{k-1}, d_k, r_k]``
    (``r_0 = r_3 = 1`` dropped)."""

    def __init__(
        self,
        shape: TTShape,
        rank: int,
        init_std: float = 0.01,
        init: str = "gaussian",
        rows: int | None = None,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"tt: init must be one of {INITS}, got {init!r}")
        (n1, n2, n3), (d1, d2, d3) = shape.rows, shape.dims
        self.shape = shape
        self.rank = rank
        if init == "gaussian":
            sigma = (init_std**2 / rank**2) ** (1 / 6)
            draw = torch.randn
        else:  # the reference's scale (3·n)^(-1/6), n the field's rows
            sigma = (3 * (rows or math.prod(shape.rows))) ** (-1 / 6)
            draw = reversed_truncated_normal
        self.core0 = nn.Parameter(draw(n1, d1, rank) * sigma)
        self.core1 = nn.Parameter(draw(n2, rank, d2, rank) * sigma)
        self.core2 = nn.Parameter(draw(n3, rank, d3) * sigma)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` -> ``[N, d1·d2·d3]``."""
        (n1, n2, n3), (d1, d2, _) = self.shape.rows, self.shape.dims
        unique, inverse = torch.unique(ids, return_inverse=True)
        prefix = unique // n3
        # All n1·n2 prefix products G1[i1]·G2[i2] at once: [n1·n2, d1·d2, r].
        left = torch.einsum("iar,jrbs->ijabs", self.core0, self.core1)
        left = left.reshape(n1 * n2, d1 * d2, self.rank)
        rows = torch.bmm(take_rows(left, prefix), take_rows(self.core2, unique % n3))
        return take_rows(rows.reshape(len(unique), -1), inverse)  # rows: [U, d1·d2, d3]

    def full_table(self) -> torch.Tensor:
        """Every row (``[n1·n2·n3, dim]``) by explicit contraction — for checks, not lookups."""
        return torch.einsum("iar,jrbs,ksc->ijkabc", self.core0, self.core1, self.core2).reshape(
            math.prod(self.shape.rows), -1
        )


@register_field_module
class TTEmbedding(FieldModule):
    """TT cores for each of its fields (one :class:`TTCores` per field, a loop per field)."""

    kind = TT_KIND

    def __init__(
        self,
        fields: Sequence[str],
        dim: int,
        shapes: Sequence[TTShape],
        rank: int,
        init_std: float = 0.01,
        init: str = "gaussian",
        rows: Sequence[int] | None = None,
    ) -> None:
        super().__init__(fields, dim)
        if any(math.prod(s.dims) != dim for s in shapes) or len(shapes) != len(self.fields):
            raise ValueError(f"tt: need one shape per field whose dims multiply to {dim}")
        self.rank = rank
        rows = rows or [math.prod(s.rows) for s in shapes]
        self.cores = nn.ModuleList(
            TTCores(s, rank, init_std, init, n) for s, n in zip(shapes, rows, strict=True)
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        values = features.values()
        rows, start = [], 0
        for cores, count in zip(self.cores, features.length_per_key(), strict=True):
            rows.append(cores(values[start : start + count]))
            start += count
        return pool_bags(torch.cat(rows), features)

    def to_config(self) -> dict[str, Any]:
        return {
            **super().to_config(),
            "rank": self.rank,
            "shapes": [asdict(c.shape) for c in self.cores],
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TTEmbedding:
        shapes = [TTShape(tuple(s["rows"]), tuple(s["dims"])) for s in config["shapes"]]
        return cls(config["fields"], config["dim"], shapes, config["rank"])

    def memory_parts(self) -> dict[str, int]:
        return {
            f"tt.{name}": sum(p.numel() * p.element_size() for p in cores.parameters())
            for name, cores in zip(self.fields, self.cores, strict=True)
        }


def solve_rank(
    features: Sequence[FeatureSpec], dim: int, budget_bytes: int, max_rank: int, min_rank: int
) -> tuple[int, list[int]]:
    """The largest rank whose layout fits, and the fields kept as tables at that rank."""
    shapes = [TTShape.for_field(f.cardinality, dim) for f in features]
    tables = [TableSpec("t", f.cardinality, dim).serve_bytes for f in features]
    for rank in range(max_rank, min_rank - 1, -1):
        cores = [s.nbytes(rank) for s in shapes]
        used = sum(map(min, tables, cores))
        if used > budget_bytes:
            continue
        kept = {i for i, (t, c) in enumerate(zip(tables, cores, strict=True)) if t <= c}
        # Budget left over at this rank turns the cheapest factorised fields back into
        # exact tables (at low ranks even tiny fields' cores undercut their tables).
        for i in sorted(set(range(len(features))) - kept, key=lambda i: tables[i] - cores[i]):
            if used + tables[i] - cores[i] <= budget_bytes:
                kept.add(i)
                used += tables[i] - cores[i]
        return rank, sorted(kept)
    smallest = sum(map(min, tables, (s.nbytes(min_rank) for s in shapes)))
    hint = (
        "; rank 1 makes every row a Kronecker product of three vectors, not a tensor train: "
        "pass min_rank=1 to allow it, or raise the budget"
        if min_rank > 1
        else "; raise the budget"
    )
    raise BudgetError(
        f"tt: even rank {min_rank} needs {describe_bytes(smallest)} of cores and tables, "
        f"but the budget is {describe_bytes(budget_bytes)}{hint}"
    )


@register
class TT(HybridMethod):
    """TT-Rec (see the module docstring). Options: ``max_rank``/``min_rank`` bound the solved
    rank (``min_rank=1`` allows Kronecker products); ``rank`` fixes it (checked against the
    budget); ``init`` is ``"gaussian"`` (default), whose ``init_std`` is the standard
    deviation of a reconstructed entry at init, or ``"approx-normal"`` (the reference's);
    ``init_scale`` bounds the uniform init of the fields kept as tables; ``lr`` is the cores'
    Adam learning rate (None: the trainer's dense one)."""

    name = TT_KIND
    option_help = {
        "rank": "TT rank (None: the largest that fits the budget)",
        "max_rank": "upper bound of the solved rank",
        "min_rank": "lower bound of the solved rank (1 allows Kronecker products)",
        "init": "core init: gaussian (default) or approx-normal (the reference's)",
        "init_std": "std of a reconstructed entry at initialisation",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        rank: int | None = None,
        max_rank: int = 64,
        min_rank: int = 2,
        init: str = "gaussian",
        init_std: float = 0.01,
        init_scale: float = 0.01,
        lr: float | None = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        if init not in INITS:
            raise ValueError(f"tt: init must be one of {INITS}, got {init!r}")
        self.init = init
        if rank is not None:
            max_rank = min_rank = rank
        if not 1 <= min_rank <= max_rank:
            raise ValueError(f"tt: need 1 <= min_rank <= max_rank, got {min_rank}, {max_rank}")
        self.rank, table_fields = solve_rank(features, dim, budget_bytes, max_rank, min_rank)
        compressed = [f for i, f in enumerate(features) if i not in table_fields]
        module = (
            TTEmbedding(
                [f.name for f in compressed],
                dim,
                [TTShape.for_field(f.cardinality, dim) for f in compressed],
                self.rank,
                init_std,
                init,
                [f.cardinality for f in compressed],
            )
            if compressed
            else None
        )
        self.assemble(table_fields, module, init_scale, lr)

    def hyperparameters(self) -> dict[str, Any]:
        tt_fields = [] if self.module is None else self.module.fields
        return {
            **super().hyperparameters(),
            "rank": self.rank,
            "init": self.init,
            "tt_fields": tt_fields,
        }


register_serving(TT_KIND)(HybridServing)
