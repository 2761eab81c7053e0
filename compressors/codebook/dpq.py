"""``dpq`` — Differentiable Product Quantization (Chen, Li & Sun, ICML 2020, arXiv 1908.09756).

Each value keeps a *query* row of ``D`` dims, trained like any table; the row is split into
``P`` sub-vectors, and sub-space ``p`` codes its sub-vector as one of ``K`` keys: ``vq`` the
nearest key (straight-through, plus the reconstruction regulariser ``reg_weight · mean
||v_code − sg(q)||²``), ``sx`` the argmax of batch-normalised dot products (backward through
the softmax). Only the packed codes (``P·⌈log2 K⌉`` bits a row) and the ``K`` values per
sub-space are served (:class:`~compressors.codebook.pq.CodebookServing`):
``serve_bytes = ⌈N·P·bits/8⌉ + G·K·D·s``. The budget solves ``P`` and ``K`` (the most code
bits a row that fit). How it works in detail, and the measured figures:
``docs/methods/dpq.md``.

Options: ``mode`` (vq | sx), ``parts``, ``choices``, ``max_parts``, ``max_choices``,
``codebooks`` (shared | field), ``storage`` (the values' dtype: fp32 | fp16), ``reg_weight``,
``batch_norm`` (sx), ``init_scale``, ``lr`` (``option_help`` says each).

Deviations from the paper (and the reference, Hetu's ``layers/dpq.py``):

* Codes are recomputed from the current query and keys at every lookup (the reference stores
  each row's code from its last training lookup).
* ``vq`` takes the plain nearest key (the reference batch-normalises distances in both modes).
* ``P`` and ``K`` are solved from the budget (``parts=``/``choices=`` fix them); codebooks are
  shared by the fields by default (``codebooks=field`` is the paper's per-table setting).
* Keys start as the query table does (uniform ±``init_scale``).
* Single process (each value is quantized before pooling; DMP's all-to-all needs equal
  batches): refused under torchrun.

Example::

    layer = build_compressor("dpq", features, dim=16, budget="10x")            # P, K solved
    layer = build_compressor("dpq", features, dim=16, budget="10x", mode="sx")
    layer = build_compressor("dpq", features, dim=16, budget="20x", parts=4, choices=256)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torchrec import KeyedJaggedTensor

from compressors.codebook.pq import (
    DTYPES,
    GROUPS,
    KIND,
    MAX_BITS,
    MODES,
    CodebookPlan,
    CodebookServing,
    ProductQuantizer,
    code_bits,
)
from compressors.core.base import (
    FLOAT_BYTES,
    Compressor,
    ExportedEmbedding,
    FeatureSpec,
    MemoryReport,
)
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.hybrid import module_optimizer_state_bytes
from compressors.core.layout import IdRangeCheck
from compressors.core.registry import register, register_serving
from compressors.core.storage import TableSpec


def divisors(n: int) -> list[int]:
    return [p for p in range(1, n + 1) if n % p == 0]


def solve_plan(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    candidates: Sequence[tuple[int, tuple[int, ...]]],
    heads: Sequence[int],
    groups: int,
    dtype: str,
    name: str,
    hint: str = "",
) -> CodebookPlan:
    """The candidate ``(P, choices per tier)`` with the most code bits that fits the budget
    (then the most choices); ``BudgetError`` naming the cheapest candidate when none fits."""
    cards = tuple(f.cardinality for f in features)
    plans = [
        CodebookPlan(dim, parts, choices, cards, tuple(heads), groups, dtype)
        for parts, choices in candidates
    ]
    if not plans:
        raise ValueError(f"{name}: no sub-space count and choices to choose from")
    fitting = [p for p in plans if p.serve_bytes <= budget_bytes]
    if not fitting:
        cheapest = min(plans, key=lambda p: p.serve_bytes)
        raise BudgetError(
            f"{name}: the smallest codes ({cheapest.parts} sub-space(s) of "
            f"{'/'.join(map(str, cheapest.choices))} choices) and {groups} codebook(s) at "
            f"{dtype} need {describe_bytes(cheapest.serve_bytes)}, but the budget is "
            f"{describe_bytes(budget_bytes)} ({sum(cards) * dim * FLOAT_BYTES / budget_bytes:.1f}x)"
            f"{hint}"
        )

    def score(p: CodebookPlan) -> tuple[int, int, int]:
        bits = sum(r * b for r, b in zip(p.tier_rows(), p.bits, strict=True)) * p.parts
        return bits, p.choices[0], -p.parts

    return max(fitting, key=score)


@register
class DPQ(Compressor):
    """Differentiable product quantization: codes + codebooks (see the module docstring)."""

    name = "dpq"
    option_help = {
        "mode": "code assignment: vq (nearest key, straight-through) or sx (softmax)",
        "parts": "sub-spaces P, a divisor of dim (None: solved from the budget)",
        "choices": "centroids K per sub-space, 2..256 (None: solved from the budget)",
        "max_parts": "upper bound of the solved P",
        "max_choices": "upper bound of the solved K",
        "codebooks": "shared (one codebook for all fields) or field (one per field)",
        "storage": "dtype of the served codebook values: fp32 or fp16",
        "reg_weight": "weight of the vq reconstruction regulariser mean ||v - sg(q)||^2",
        "batch_norm": "sx: batch-normalise the dot products (no affine), as the authors",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        mode: str = "vq",
        parts: int | None = None,
        choices: int | None = None,
        max_parts: int = 16,
        max_choices: int = 256,
        codebooks: str = "shared",
        storage: str = "fp32",
        reg_weight: float = 1.0,
        batch_norm: bool = True,
        init_scale: float = 0.01,
        lr: float | None = None,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        name = self.name
        if mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {MODES}, got {mode!r}")
        if codebooks not in GROUPS:
            raise ValueError(f"{name}: codebooks must be one of {GROUPS}, got {codebooks!r}")
        if storage not in DTYPES:
            raise ValueError(
                f"{name}: storage is the codebook values' dtype, one of {sorted(DTYPES)} "
                f"(codes are packed integers already), got {storage!r}"
            )
        if parts is not None and (parts < 1 or dim % parts):
            raise ValueError(f"{name}: parts must divide dim {dim}, got {parts}")
        for label, k in (("choices", choices), ("max_choices", max_choices)):
            if k is not None and not 2 <= k <= 1 << MAX_BITS:
                raise ValueError(f"{name}: {label} must lie in [2, {1 << MAX_BITS}], got {k}")
        if reg_weight < 0:
            raise ValueError(f"{name}: reg_weight must be >= 0, got {reg_weight}")
        self.mode = mode
        self.codebook_scope = codebooks
        self.reg_weight = reg_weight
        self.lr = lr
        groups = 1 if codebooks == "shared" else len(self.features)
        part_options = (
            [parts] if parts is not None else [p for p in divisors(dim) if p <= max_parts]
        )
        self.plan_ = solve_plan(
            self.features,
            dim,
            budget_bytes,
            [(p, k) for p in part_options for k in self.tier_choices(choices, max_choices)],
            self.head_rows(),
            groups,
            storage,
            name,
            self.refusal_hint(storage, codebooks),
        )
        self.check_budget(self.plan_.serve_bytes, "the solved codes and codebooks")
        self.quantizer = ProductQuantizer(
            self.feature_names, self.plan_, mode, init_scale, batch_norm
        )
        self.quantizer.serve_fp16 = storage == "fp16"
        self.check_ids = IdRangeCheck({f.name: f.cardinality for f in self.features})

    # ---------------------------------------------------------------- what subclasses vary
    def tier_choices(self, choices: int | None, max_choices: int) -> list[tuple[int, ...]]:
        """Choices per tier to consider (DPQ: one tier, powers of two up to the bound)."""
        if choices is not None:
            return [(choices,)]
        return [(1 << b,) for b in range(1, code_bits(max_choices) + 1) if 1 << b <= max_choices]

    def refusal_hint(self, storage: str, codebooks: str) -> str:
        """What would shrink the smallest configuration (the end of a budget refusal)."""
        tips = ["storage=fp16 halves the codebook"] if storage == "fp32" else []
        if codebooks == "field":
            tips.append("codebooks=shared keeps one codebook")
        return f"; {', '.join(tips)}" if tips else ""

    def head_rows(self) -> list[int]:
        """Tier-0 rows per field (DPQ: every row)."""
        return [f.cardinality for f in self.features]

    # ---------------------------------------------------------------- the contract
    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"{self.name}: quantizes every looked-up value before pooling, reading the "
                "query table with one bag per value (a batch size that differs between "
                "ranks, which DMP's table-wise all-to-all does not take); train it without "
                "torchrun"
            )
        features = self.quantizer_input(features)
        return self.quantizer(features).view(-1, self.num_features, self.dim)

    def quantizer_input(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        if keys != self.feature_names:
            missing = set(self.feature_names) - set(keys)
            if missing:
                raise KeyError(f"input lacks sparse features {sorted(missing)}")
            features = features.permute([keys.index(k) for k in self.feature_names])
        self.check_ids(features)
        return features

    def penalty(self) -> torch.Tensor:
        if not self.training or self.mode != "vq":
            return torch.zeros((), device=self.quantizer.keys.device)
        return self.reg_weight * self.quantizer.regularizer

    def optimizer_groups(self) -> list[dict[str, Any]]:
        q = self.quantizer
        params = [q.keys] + ([q.values_] if q.values_ is not None else [])
        return [{"params": params, "optimizer": "adam", "lr": self.lr, "embedding": True}]

    def memory(self) -> MemoryReport:
        p = self.plan_
        q = self.quantizer
        params = [q.keys] + ([q.values_] if q.values_ is not None else [])
        weights = sum(t.numel() for t in params) * FLOAT_BYTES
        buffers = sum(b.numel() * FLOAT_BYTES for b in (q.bn.buffers() if q.bn else []))
        table = TableSpec("query", sum(p.cardinalities), self.dim)
        return MemoryReport(
            serve_bytes=p.serve_bytes,
            train_bytes=table.train_bytes(self.table_optimizer)
            + weights
            + buffers
            + module_optimizer_state_bytes(params, self.module_optimizer),
            full_bytes=self.full_bytes,
            parts=p.parts_bytes(),
        )

    def plan_details(self) -> dict[str, Any]:
        return {"codebook": self.plan_.to_json()}

    def export(self) -> ExportedEmbedding:
        return self.quantizer.export(self.name)

    def set_storage(self, dtype: str) -> None:
        """Serves the codebook values at ``dtype`` (fp32 or fp16; the codes are fixed)."""
        if dtype not in DTYPES:
            raise ValueError(
                f"{self.name}: --storage {dtype} refused; the codes are packed integers and "
                f"the codebook values serve at {' or '.join(sorted(DTYPES))}"
            )
        self.plan_ = replace(self.plan_, dtype=dtype)
        self.quantizer.plan = self.plan_
        self.quantizer.serve_fp16 = dtype == "fp16"

    def hyperparameters(self) -> dict[str, Any]:
        p = self.plan_
        return {
            "mode": self.mode,
            "parts": p.parts,
            "choices": list(p.choices),
            "bits": list(p.bits),
            "codebooks": self.codebook_scope,
            "storage": p.dtype,
            "bytes_per_row": p.serve_bytes / sum(p.cardinalities),
        }


register_serving(KIND)(CodebookServing)
