"""``binary`` — closed-form residual binarization of trained embeddings (the residual scheme
of "Binary Embedding-based Retrieval at Tencent", Gan et al., KDD 2023, without its learned
encoder).

What this is: a post-training, closed-form greedy residual binarization. Tencent's method
*learns* the binarization end to end with a recurrent MLP encoder inside a retrieval model;
that encoder is not implemented here (METHODS.md asks for the residual scheme). A row is
approximated by ``b`` scaled sign vectors fitted greedily to the residual::

    r_1 = e,   e ≈ Σ_{k=1..b} s_k · sign(r_k),   r_{k+1} = r_k − s_k · sign(r_k)

with ``s_k = mean|r_k|`` (the least-squares scale of a sign vector), per row
(``scales="row"``, default) or shared by all rows of a field (``scales="field"``: the mean
over the field's entries). Codes are bit-packed (one bit per dimension per plane, 8
dimensions a byte); scales are fp16. A row costs ``b · ceil(D/8)`` code bytes plus, per row,
``2·b`` scale bytes: at b=1, D=16 a per-row scale is half the row (16x), per-field scales
make it 32x.

Budget: ``bits="auto"`` (default) gives every field its own number of planes ``b_f ∈ 1..8``
so the total comes close to the budget (asking 10x gives ≈10x, not the 16x of one plane
everywhere): a multiple-choice knapsack (:func:`compressors.precision.common.choose_dtypes`)
minimising the expected frequency-weighted error ``W_f · ρ^{b_f}``, where ``W_f`` is the
field's total train count and ``ρ = 1 − 2/π`` the residual energy a sign plane leaves of a
Gaussian row; it is solved before training (the codes' shapes are fixed from the start), so
it spends spare bytes on the fields where a plane removes the most error per byte (the small,
often-read ones first). ``bits=<int>`` binarizes every field alike.

Stages: ``train`` (fp32 TorchRec/fbgemm tables, like ``full``) -> ``binarize`` (codes and
scales from the trained table) -> optionally ``finetune`` for ``finetune_epochs`` with the
codes frozen: the scales train (Adam, as any dense parameter) and so does the rest of the
network, which the paper's fine-tune leaves to the retrieval towers. After ``binarize`` the
model itself looks rows up through the binary codes, so training metrics and the exported
artifact agree; scales are used at fp16 in both (straight-through during fine-tuning).

Serving (export kind ``binary``) gathers each field's packed codes of the looked-up rows,
unpacks them with a 256-entry sign table, weights the planes by their scales and pools the
bags — vectorised torch, no fbgemm kernel exists for this format.

Deviations: closed form instead of the learned recurrent encoder (above); every field is
binarized (no fp32 threshold: the codes shrink each row by the same factor whatever the
field's size). The fp32 training table lives in a TorchRec EBC, but ``binarize`` reads it
whole, so training is single-process.

Example::

    layer = build_compressor("binary", features, dim=16, budget="10x")   # 1-2 planes a field
    layer = build_compressor("binary", features, dim=16, budget="16x", bits=1)
    layer = build_compressor("binary", features, dim=16, budget="30x", scales="field")
    layer = build_compressor("binary", features, dim=16, budget="8x", finetune_epochs=0.2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import (
    FLOAT_BYTES,
    Compressor,
    ExportedEmbedding,
    FeatureSpec,
    MemoryReport,
    Stage,
)
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.layout import DirectMap, OffsetMap
from compressors.core.registry import register, register_serving
from compressors.core.storage import Lookup, TableSpec, TrainTables
from compressors.precision.common import choose_dtypes

if TYPE_CHECKING:
    from compressors.core.base import StageContext

KIND = "binary"
AUTO = "auto"
MAX_BITS = 8
SCALE_BYTES = 2  # fp16
SCALES = ("row", "field")
TABLE = "shared"
# Residual energy one least-squares sign plane leaves of a Gaussian vector: 1 - (E|x|)^2/E[x^2].
PLANE_RESIDUAL = 1 - 2 / math.pi
# Bit j of byte c, as a sign: SIGNS[c, j] = +1 if (c >> j) & 1 else -1.
SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float() * 2 - 1


def code_bytes(dim: int) -> int:
    """Bytes of one bit-plane of a row."""
    return -(-dim // 8)


def binary_row_bytes(dim: int, bits: int) -> int:
    """Bytes of a row with per-row scales: ``bits`` planes of codes and fp16 scales."""
    return bits * (code_bytes(dim) + SCALE_BYTES)


def field_bytes(rows: int, dim: int, bits: int, scales: str) -> int:
    """Serving bytes of a field of ``rows`` rows at ``bits`` planes."""
    scale_count = rows * bits if scales == "row" else bits
    return rows * bits * code_bytes(dim) + scale_count * SCALE_BYTES


def binarize(
    weight: torch.Tensor, bits: int, per_row: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual binarization of rows ``[n, D]`` -> (codes uint8 ``[n, b, ceil(D/8)]``,
    fp16 scales ``[n, b]``, or ``[b]`` with ``per_row=False``). Each residual subtracts the
    fp16 scale actually served."""
    n, dim = weight.shape
    pad = code_bytes(dim) * 8 - dim
    residual = weight.detach().float().clone()
    planes, scales = [], []
    for _ in range(bits):
        positive = residual >= 0
        scale = (residual.abs().mean(1) if per_row else residual.abs().mean().view(1)).half()
        residual -= scale.float().unsqueeze(1) * (positive.float() * 2 - 1)
        padded = F.pad(positive.to(torch.int32), (0, pad)).view(n, -1, 8)
        planes.append((padded << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8))
        scales.append(scale)
    stacked = torch.stack(scales, 1)
    return torch.stack(planes, 1), stacked if per_row else stacked[0]


def unbinarize(codes: torch.Tensor, scales: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows ``Σ_k s_k · sign_k`` from codes ``[n, b, m]`` and fp32 scales ``[n, b]`` (or
    ``[b]``, shared by the rows)."""
    signs = SIGNS[codes.long()].flatten(2)[..., :dim]  # [n, b, D]
    if scales.dim() == 1:
        return torch.einsum("nbd,b->nd", signs, scales)
    return torch.einsum("nbd,nb->nd", signs, scales)


def pooled_binary_lookup(
    features: KeyedJaggedTensor,
    codes: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    dim: int,
) -> torch.Tensor:
    """``[B, F, D]`` sum-pooled rows of a KJT of field ids (keys in field order), field ``f``
    decoded from ``codes[f]``/``scales[f]``.

    Every looked-up row is decoded where it stands (no ``unique``: sorting a batch costs more
    than decoding its repeats), then each bag's rows are summed (empty bags give zeros)."""
    values, start, parts = features.values(), 0, []
    for f, count in enumerate(features.length_per_key()):
        ids = values[start : start + count]
        start += count
        row_scales = scales[f] if scales[f].dim() == 1 else scales[f][ids]
        parts.append(unbinarize(codes[f][ids], row_scales, dim))
    decoded = torch.cat(parts) if parts else values.new_zeros(0, dim, dtype=torch.float32)
    pooled = torch.segment_reduce(decoded, "sum", lengths=features.lengths())
    return pooled.view(len(codes), -1, dim).transpose(0, 1)


def solve_field_bits(
    features: Sequence[FeatureSpec], dim: int, budget_bytes: int, scales: str
) -> list[int]:
    """Planes per field: the knapsack of the module docstring (expected error ``W_f·ρ^b``)."""
    costs, errors = [], []
    for f in features:
        weight = float(f.cardinality if f.frequencies is None else max(f.frequencies.sum(), 1))
        options = {f"{b}": field_bytes(f.cardinality, dim, b, scales) for b in range(1, 9)}
        costs.append(options)
        errors.append({k: weight * PLANE_RESIDUAL ** int(k) for k in options})
    return [int(b) for b in choose_dtypes(costs, errors, budget_bytes)]


@register
class Binary(Compressor):
    """fp32 training, then residual-binarized serving (see module docstring). Options:
    ``bits`` ("auto": planes per field solved to the budget; or one count for all fields),
    ``scales`` ("row" | "field"), ``finetune_epochs``, ``init_scale``."""

    name = "binary"
    option_help = {
        "bits": "bit-planes per dimension (auto: per field, to the budget)",
        "scales": "row (an fp16 scale per row and plane) or field (one per field and plane)",
        "finetune_epochs": "epochs of fine-tuning after binarization (0: none)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        bits: int | str = AUTO,
        scales: str = "row",
        finetune_epochs: float = 0.0,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        if scales not in SCALES:
            raise ValueError(f"binary: scales must be one of {SCALES}, got {scales!r}")
        self.scale_mode = scales
        offsets, rows = [], 0
        for f in self.features:
            offsets.append(rows)
            rows += f.cardinality
        self.rows = rows
        self.offsets = offsets
        self.field_bits = self._solve_bits(bits)
        self.finetune_epochs = finetune_epochs
        self.stages = (Stage("train"), Stage("binarize", trains=False)) + (
            (Stage("finetune", epochs=finetune_epochs),) if finetune_epochs > 0 else ()
        )
        names = self.feature_names
        self.index_map = OffsetMap(names, offsets)
        self.field_map = DirectMap(names)
        self.tables = TrainTables(
            [TableSpec(TABLE, rows, dim)],
            [Lookup(n, TABLE, field=i) for i, n in enumerate(names)],
            init_scale=init_scale,
        )
        for i, (f, b) in enumerate(zip(self.features, self.field_bits, strict=True)):
            self.register_buffer(
                f"codes_{i}", torch.zeros(f.cardinality, b, code_bytes(dim), dtype=torch.uint8)
            )
        self.scales = nn.ParameterList(
            nn.Parameter(torch.zeros((f.cardinality, b) if scales == "row" else (b,)))
            for f, b in zip(self.features, self.field_bits, strict=True)
        )
        self.register_buffer("binarized", torch.tensor(False))

    @property
    def codes(self) -> list[torch.Tensor]:
        return [getattr(self, f"codes_{i}") for i in range(self.num_features)]

    def _bytes(self, bits: Sequence[int]) -> int:
        return sum(
            field_bytes(f.cardinality, self.dim, b, self.scale_mode)
            for f, b in zip(self.features, bits, strict=True)
        )

    def _solve_bits(self, bits: int | str) -> list[int]:
        one_plane = self._bytes([1] * self.num_features)
        if bits == AUTO:
            if one_plane > self.budget_bytes:
                scale = "a 2-byte fp16 scale per row" if self.scale_mode == "row" else "scales"
                raise BudgetError(
                    f"binary: one bit-plane (ceil(dim/8) code bytes + {scale}) "
                    f"needs {describe_bytes(one_plane)}, at most "
                    f"{self.full_bytes / one_plane:.1f}x, but the budget is "
                    f"{describe_bytes(self.budget_bytes)} "
                    f"({self.full_bytes / self.budget_bytes:.1f}x); "
                    + (
                        "scales='field' halves the bytes at b=1, or use an inter-feature method"
                        if self.scale_mode == "row"
                        else "use an inter-feature method"
                    )
                )
            return solve_field_bits(self.features, self.dim, self.budget_bytes, self.scale_mode)
        if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"binary: bits must be 'auto' or 1..{MAX_BITS}, got {bits!r}")
        self.check_budget(self._bytes([bits] * self.num_features), f"{bits} bit-planes")
        return [bits] * self.num_features

    def _served_scales(self) -> list[torch.Tensor]:
        # fp16 scales as served; straight-through so fine-tuning still gets gradients.
        return [s + (s.half().float() - s).detach() for s in self.scales]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if bool(self.binarized):
            return pooled_binary_lookup(
                self.field_map(features), self.codes, self._served_scales(), self.dim
            )
        mapped = self.index_map(features)
        return self.tables(mapped).view(-1, self.num_features, self.dim)

    def run_stage(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name != "binarize":
            return super().run_stage(stage, ctx)
        weight = self.tables.weights()[TABLE]
        per_row = self.scale_mode == "row"
        with torch.no_grad():
            for i, (f, b) in enumerate(zip(self.features, self.field_bits, strict=True)):
                start = self.offsets[i]
                codes, scales = binarize(weight[start : start + f.cardinality], b, per_row)
                getattr(self, f"codes_{i}").copy_(codes)
                self.scales[i].copy_(scales.float())
        self.binarized.fill_(True)

    def memory(self) -> MemoryReport:
        codes = sum(c.numel() for c in self.codes)
        scale_count = sum(s.numel() for s in self.scales)
        table = TableSpec(TABLE, self.rows, self.dim).train_bytes(self.table_optimizer)
        # Fine-tuning trains the fp32 scales with Adam (two more floats each).
        scale_train = scale_count * FLOAT_BYTES * (3 if self.finetune_epochs > 0 else 1)
        return MemoryReport(
            serve_bytes=codes + scale_count * SCALE_BYTES,
            train_bytes=table + codes + scale_train,
            full_bytes=self.full_bytes,
            parts={"codes": codes, "scales": scale_count * SCALE_BYTES},
        )

    def export(self) -> ExportedEmbedding:
        return binary_export(
            self.feature_names,
            self.dim,
            self.codes,
            [s.detach() for s in self.scales],
            self.scale_mode,
        )

    def hyperparameters(self) -> dict[str, Any]:
        total = self._bytes(self.field_bits)
        return {
            "bits": dict(zip(self.feature_names, self.field_bits, strict=True)),
            "scales": self.scale_mode,
            "bytes_per_row": total / self.rows,
            "finetune_epochs": self.finetune_epochs,
            "binarized": bool(self.binarized),
        }


def binary_export(
    names: Sequence[str],
    dim: int,
    codes: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    scale_mode: str = "row",
) -> ExportedEmbedding:
    """The ``binary`` export of per-field codes and scales (fp16 in the artifact)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, (c, s) in enumerate(zip(codes, scales, strict=True)):
        tensors[f"codes.{i}"] = c.clone()
        tensors[f"scales.{i}"] = s.half()
    return ExportedEmbedding(
        kind=KIND,
        config={
            "method": "binary",
            "dim": dim,
            "fields": list(names),
            "bits": [int(c.shape[1]) for c in codes],
            "scales": scale_mode,
        },
        tensors=tensors,
    )


@register_serving(KIND)
class BinaryServing(nn.Module):
    """Serving side of ``binary``: per-field codes, unpacked on the fly."""

    def __init__(self, exported: ExportedEmbedding) -> None:
        super().__init__()
        cfg = exported.config
        self.field_map = DirectMap(cfg["fields"])
        self.dim = cfg["dim"]
        self.num_fields = len(cfg["fields"])
        for i in range(self.num_fields):
            self.register_buffer(f"codes_{i}", exported.tensors[f"codes.{i}"])
            self.register_buffer(f"scales_{i}", exported.tensors[f"scales.{i}"].float())

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        n = self.num_fields
        return pooled_binary_lookup(
            self.field_map(features),
            [getattr(self, f"codes_{i}") for i in range(n)],
            [getattr(self, f"scales_{i}") for i in range(n)],
            self.dim,
        )
