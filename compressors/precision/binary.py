"""``binary`` — residual binarization of trained embeddings (after "Binary Embedding-based
Retrieval at Tencent", Gan et al., KDD 2023).

A row is approximated by ``b`` scaled sign vectors fitted greedily to the residual::

    r_1 = e,   e ≈ Σ_{k=1..b} s_k · sign(r_k),   r_{k+1} = r_k − s_k · sign(r_k)

with ``s_k = mean|r_k|`` per row (the least-squares scale of a sign vector). Codes are
bit-packed (one bit per dimension per plane, 8 dimensions a byte) and the ``b`` scales per
row are fp16, so a row costs ``b · (ceil(D/8) + 2)`` bytes: 4 bytes at b=1, D=16 (16x).
The budget solves ``b`` (the most planes, up to 8, that fit).

Stages: ``train`` (fp32 TorchRec/fbgemm tables, like ``full``) -> ``binarize`` (codes and
scales from the trained table) -> optionally ``finetune`` for ``finetune_epochs`` with the
codes frozen: the scales train (Adam, as any dense parameter) and so does the rest of the
network, which the paper's fine-tune leaves to the retrieval towers. After ``binarize`` the
model itself looks rows up through the binary codes, so training metrics and the exported
artifact agree; scales are used at fp16 in both (straight-through during fine-tuning).

Serving (export kind ``binary``) gathers the packed codes of the looked-up rows, unpacks
them with a 256-entry sign table, weights the planes by their scales and pools the bags —
vectorised torch, no fbgemm kernel exists for this format.

Deviations: the Tencent paper learns the binarization end to end with a recurrent MLP for a
retrieval model; we keep its residual scheme in closed form (post-training), as METHODS.md
asks. Scales are per row; every field is binarized alike (no fp32 threshold: the codes
shrink each row by the same factor whatever the field's size). The fp32 training table
lives in a TorchRec EBC, but ``binarize`` reads it whole, so training is single-process.

Example::

    layer = build_compressor("binary", features, dim=16, budget="16x")            # b = 1
    layer = build_compressor("binary", features, dim=16, budget="8x", finetune_epochs=0.2)
"""

from __future__ import annotations

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
from compressors.core.layout import INDEX_MAPS, IndexMap, OffsetMap
from compressors.core.registry import register, register_serving
from compressors.core.storage import Lookup, TableSpec, TrainTables

if TYPE_CHECKING:
    from compressors.core.base import StageContext

KIND = "binary"
AUTO = "auto"
MAX_BITS = 8
SCALE_BYTES = 2  # fp16
TABLE = "shared"
_CHUNK_ROWS = 1 << 20
# Bit j of byte c, as a sign: SIGNS[c, j] = +1 if (c >> j) & 1 else -1.
SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float() * 2 - 1


def code_bytes(dim: int) -> int:
    """Bytes of one bit-plane of a row."""
    return -(-dim // 8)


def binary_row_bytes(dim: int, bits: int) -> int:
    return bits * (code_bytes(dim) + SCALE_BYTES)


def binarize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual binarization of rows ``[n, D]`` -> (codes uint8 ``[n, b, ceil(D/8)]``,
    fp16 scales ``[n, b]``). Each residual subtracts the fp16 scale actually served."""
    n, dim = weight.shape
    pad = code_bytes(dim) * 8 - dim
    residual = weight.detach().float().clone()
    planes, scales = [], []
    for _ in range(bits):
        positive = residual >= 0
        scale = residual.abs().mean(1).half()
        residual -= scale.float().unsqueeze(1) * (positive.float() * 2 - 1)
        padded = F.pad(positive.to(torch.int32), (0, pad)).view(n, -1, 8)
        planes.append((padded << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8))
        scales.append(scale)
    return torch.stack(planes, 1), torch.stack(scales, 1)


def unbinarize(codes: torch.Tensor, scales: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows ``Σ_k s_k · sign_k`` from codes ``[n, b, m]`` and fp32 scales ``[n, b]``."""
    signs = SIGNS[codes.long()].flatten(2)[..., :dim]  # [n, b, D]
    return torch.einsum("nbd,nb->nd", signs, scales)


def pooled_binary_lookup(
    mapped: KeyedJaggedTensor, codes: torch.Tensor, scales: torch.Tensor, num_fields: int, dim: int
) -> torch.Tensor:
    """``[B, F, D]`` sum-pooled rows of a KJT of table rows (one key per field).

    Every looked-up row is decoded where it stands (no ``unique``: sorting a batch costs more
    than decoding its repeats), then each bag's rows are summed (empty bags give zeros)."""
    rows = mapped.values()
    decoded = unbinarize(codes[rows], scales[rows], dim)
    pooled = torch.segment_reduce(decoded, "sum", lengths=mapped.lengths())
    return pooled.view(num_fields, -1, dim).transpose(0, 1)


@register
class Binary(Compressor):
    """fp32 training, then residual-binarized serving (see module docstring)."""

    name = "binary"
    option_help = {
        "bits": "bit-planes per dimension (auto: as many as fit)",
        "finetune_epochs": "epochs of fine-tuning after binarization (0: none)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        bits: int | str = AUTO,
        finetune_epochs: float = 0.0,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        offsets, rows = [], 0
        for f in self.features:
            offsets.append(rows)
            rows += f.cardinality
        self.rows = rows
        self.bits = self._solve_bits(bits)
        self.finetune_epochs = finetune_epochs
        self.stages = (Stage("train"), Stage("binarize", trains=False)) + (
            (Stage("finetune", epochs=finetune_epochs),) if finetune_epochs > 0 else ()
        )
        names = self.feature_names
        self.index_map = OffsetMap(names, offsets)
        self.tables = TrainTables(
            [TableSpec(TABLE, rows, dim)],
            [Lookup(n, TABLE, field=i) for i, n in enumerate(names)],
            init_scale=init_scale,
        )
        self.register_buffer(
            "codes", torch.zeros(rows, self.bits, code_bytes(dim), dtype=torch.uint8)
        )
        self.scales = nn.Parameter(torch.zeros(rows, self.bits))
        self.register_buffer("binarized", torch.tensor(False))

    def _solve_bits(self, bits: int | str) -> int:
        per_plane = self.rows * binary_row_bytes(self.dim, 1)
        if bits == AUTO:
            solved = min(MAX_BITS, self.budget_bytes // per_plane)
            if solved < 1:
                raise BudgetError(
                    f"binary: one bit-plane (ceil(dim/8) code bytes + a 2-byte fp16 scale per "
                    f"row) needs {describe_bytes(per_plane)}, at most "
                    f"{self.full_bytes / per_plane:.1f}x, but the budget is "
                    f"{describe_bytes(self.budget_bytes)} "
                    f"({self.full_bytes / self.budget_bytes:.1f}x); use an inter-feature method"
                )
            return int(solved)
        if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"binary: bits must be 'auto' or 1..{MAX_BITS}, got {bits!r}")
        self.check_budget(bits * per_plane, f"{bits} bit-planes")
        return bits

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        mapped = self.index_map(features)
        if bool(self.binarized):
            # fp16 scales as served; straight-through so fine-tuning still gets gradients.
            scales = self.scales + (self.scales.half().float() - self.scales).detach()
            return pooled_binary_lookup(mapped, self.codes, scales, self.num_features, self.dim)
        return self.tables(mapped).view(-1, self.num_features, self.dim)

    def run_stage(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name != "binarize":
            return super().run_stage(stage, ctx)
        weight = self.tables.weights()[TABLE]
        with torch.no_grad():
            for start in range(0, self.rows, _CHUNK_ROWS):
                codes, scales = binarize(weight[start : start + _CHUNK_ROWS], self.bits)
                self.codes[start : start + len(codes)] = codes
                self.scales[start : start + len(codes)] = scales.float()
        self.binarized.fill_(True)

    def memory(self) -> MemoryReport:
        codes = self.codes.numel()
        scales = self.scales.numel() * SCALE_BYTES
        table = TableSpec(TABLE, self.rows, self.dim).train_bytes(self.table_optimizer)
        # Fine-tuning trains the fp32 scales with Adam (two more floats each).
        scale_train = self.scales.numel() * FLOAT_BYTES * (3 if self.finetune_epochs > 0 else 1)
        return MemoryReport(
            serve_bytes=codes + scales,
            train_bytes=table + codes + scale_train,
            full_bytes=self.full_bytes,
            parts={"codes": codes, "scales": scales},
        )

    def export(self) -> ExportedEmbedding:
        return ExportedEmbedding(
            kind=KIND,
            config={
                "method": self.name,
                "dim": self.dim,
                "num_fields": self.num_features,
                "bits": self.bits,
                "index_map": self.index_map.to_config(),
            },
            tensors={
                "codes": self.codes.clone(),
                "scales": self.scales.detach().half(),
                **{f"index_map.{k}": v for k, v in self.index_map.tensors().items()},
            },
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "bytes_per_row": binary_row_bytes(self.dim, self.bits),
            "finetune_epochs": self.finetune_epochs,
            "binarized": bool(self.binarized),
        }


@register_serving(KIND)
class BinaryServing(nn.Module):
    """Serving side of ``binary``: the same index map, unpacking the codes on the fly."""

    def __init__(self, exported: ExportedEmbedding) -> None:
        super().__init__()
        cfg = exported.config
        prefix = "index_map."
        self.index_map: IndexMap = INDEX_MAPS[cfg["index_map"]["kind"]].from_config(
            cfg["index_map"],
            {k[len(prefix) :]: v for k, v in exported.tensors.items() if k.startswith(prefix)},
        )
        self.num_fields = cfg["num_fields"]
        self.dim = cfg["dim"]
        self.register_buffer("codes", exported.tensors["codes"])
        self.register_buffer("scales", exported.tensors["scales"].float())

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return pooled_binary_lookup(
            self.index_map(features), self.codes, self.scales, self.num_fields, self.dim
        )
