"""``binary`` — closed-form residual binarization of trained embeddings (the residual scheme
of "Binary Embedding-based Retrieval at Tencent", Gan et al., KDD 2023, without its learned
encoder).

A row is approximated greedily by ``b`` scaled sign planes fitted to the residual,
``e ≈ Σ_k s_k · sign(r_k)``, ``s_k = mean|r_k|`` per row or per field (``scales``); codes
bit-packed, scales fp16. ``bits="auto"`` gives each field its own ``b_f`` by a knapsack that
fills the budget. Stages: ``train`` (fp32 tables) -> ``binarize`` -> optional ``finetune``
(codes frozen, scales and network train). Serving (kind ``binary``, :class:`BinaryServing`)
runs fbgemm's kernel over int2 plane rows or rows decoded at load (``decode``). How it works
in detail, and the measured serving speeds: ``docs/methods/binary.md``.

Options: ``bits`` (``auto`` | 1..8), ``scales`` (``row`` | ``field``), ``finetune_epochs``,
``init_scale``.

Deviations from the paper:

- Closed form instead of the paper's learned recurrent encoder.
- Every field is binarized (no fp32 threshold: the codes shrink each row alike).
- ``binarize`` reads the fp32 training table whole, so training is single-process.

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
from compressors.core.layout import DirectMap, IdRangeCheck, OffsetMap
from compressors.core.registry import register, register_serving
from compressors.core.storage import (
    SCALE_BIAS_BYTES,
    Lookup,
    ServeTables,
    TableSpec,
    TrainTables,
)
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
_SIGNS_ON: dict[torch.device, torch.Tensor] = {}  # SIGNS copied once to each device that reads it
# Serving decodes (BinaryServing): "auto" serves a one-plane field as plane rows and a field
# of more planes as fp16 rows decoded at load, so every id is one kernel lookup; "planes"
# serves every plane as its own row (exact at any b, b lookups an id); "rows" decodes every
# field to fp16 rows; "bits" keeps the packed codes (1x memory, decoded per lookup in torch).
DECODES = ("auto", "planes", "rows", "bits")
PLANE_DTYPE = "int2"  # fbgemm row type of a served plane (codes 0/1)
ROW_DTYPE = "fp16"  # fbgemm row type of a decoded multi-plane row
DECODE_CHUNK = 1 << 16  # rows re-laid at once at load: bounds the temporaries
BINARIZE_CHUNK_ROWS = 1 << 16  # rows binarized at a time with per-row scales


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
    if per_row and n > BINARIZE_CHUNK_ROWS:
        # Rows are independent: a chunk at a time (the whole field's float and int32
        # temporaries are ~400 bytes a row at dim 16), the same codes and scales.
        codes = torch.empty(n, bits, code_bytes(dim), dtype=torch.uint8, device=weight.device)
        row_scales = torch.empty(n, bits, dtype=torch.float16, device=weight.device)
        for start in range(0, n, BINARIZE_CHUNK_ROWS):
            stop = min(n, start + BINARIZE_CHUNK_ROWS)
            codes[start:stop], row_scales[start:stop] = binarize(weight[start:stop], bits)
        return codes, row_scales
    pad = code_bytes(dim) * 8 - dim
    residual = weight.detach().float().clone()
    planes, scales = [], []
    for _ in range(bits):
        positive = residual >= 0
        scale = (residual.abs().mean(1) if per_row else residual.abs().mean().view(1)).half()
        residual -= scale.float().unsqueeze(1) * (positive.float() * 2 - 1)
        padded = F.pad(positive.to(torch.int32), (0, pad)).view(n, -1, 8)
        shifts = torch.arange(8, dtype=torch.int32, device=padded.device)
        planes.append((padded << shifts).sum(-1).to(torch.uint8))
        scales.append(scale)
    stacked = torch.stack(scales, 1)
    return torch.stack(planes, 1), stacked if per_row else stacked[0]


def unbinarize(codes: torch.Tensor, scales: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows ``Σ_k s_k · sign_k`` from codes ``[n, b, m]`` and fp32 scales ``[n, b]`` (or
    ``[b]``, shared by the rows)."""
    table = SIGNS if codes.device.type == "cpu" else _signs_on(codes.device)
    signs = table[codes.long()].flatten(2)[..., :dim]  # [n, b, D]
    if scales.dim() == 1:
        return torch.einsum("nbd,b->nd", signs, scales)
    return torch.einsum("nbd,nb->nd", signs, scales)


def _signs_on(device: torch.device) -> torch.Tensor:
    if device not in _SIGNS_ON:
        _SIGNS_ON[device] = SIGNS.to(device)
    return _SIGNS_ON[device]


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


def _spread_table(bits: int) -> torch.Tensor:
    """``[256, bits]`` uint8: a code byte (8 dimensions, one bit each) re-packed as fbgemm's
    ``bits``-bit codes of the same 8 dimensions (each 0 or 1, low bits first)."""
    per_byte = 8 // bits
    dims = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).view(256, bits, per_byte)
    return (dims << (torch.arange(per_byte) * bits)).sum(-1).to(torch.uint8)


_SPREAD = {dtype: _spread_table(bits) for dtype, bits in (("int2", 2), ("int4", 4), ("int8", 8))}


def plane_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: str) -> torch.Tensor:
    """Codes ``[n, b, m]`` and fp16 scales (``[n, b]`` or ``[b]``) -> ``[n·b, row_bytes(8m,
    dtype)]`` uint8 rows of fbgemm's int-N inference layout ``[scale | bias | codes]``: plane
    ``p`` of row ``r`` is row ``r·b + p`` (a row's planes adjacent in memory), with codes {0, 1},
    scale ``2s`` and bias ``-s``. It decodes to exactly ``s · sign``: ``2s`` and ``-s`` are exact
    in fp16 (for ``|s| < 2^15``; the caller checks) and ``code · 2s - s`` is exact in fp32."""
    n, b, m = codes.shape
    spread = _SPREAD[dtype]
    out = torch.empty(n * b, SCALE_BIAS_BYTES + m * spread.shape[1], dtype=torch.uint8)
    half = scales.half()
    for start in range(0, n, DECODE_CHUNK):
        stop = min(n, start + DECODE_CHUNK)
        rows = slice(start * b, stop * b)
        out[rows, SCALE_BIAS_BYTES:] = spread[codes[start:stop].long()].flatten(0, 1).flatten(1)
        s = (half[start:stop] if half.dim() == 2 else half.expand(stop - start, b)).reshape(-1, 1)
        out[rows, :SCALE_BIAS_BYTES] = torch.cat([s * 2, -s], dim=1).view(torch.uint8)
    return out


def decoded_rows(codes: torch.Tensor, scales: torch.Tensor, width: int) -> torch.Tensor:
    """``[n, width]`` fp16 rows ``Σ_p s_p · sign_p`` (summed in fp32, then rounded once;
    exact for one plane, whose values ``±s`` are fp16 numbers)."""
    n = codes.shape[0]
    out = torch.empty(n, width, dtype=torch.float16)
    scales = scales.float()
    for start in range(0, n, DECODE_CHUNK):
        stop = min(n, start + DECODE_CHUNK)
        own = scales if scales.dim() == 1 else scales[start:stop]
        out[start:stop] = unbinarize(codes[start:stop], own, width).half()
    return out


def checked_export(
    exported: ExportedEmbedding,
) -> tuple[list[str], int, list[torch.Tensor], list[torch.Tensor]]:
    """``(fields, dim, codes, scales)`` of a ``binary`` export, every shape and dtype checked
    against its config before anything is allocated from them (artifacts are untrusted)."""
    cfg, tensors = exported.config, exported.tensors
    names, bits, dim, mode = cfg["fields"], cfg["bits"], cfg["dim"], cfg.get("scales", "row")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError("binary: config 'fields' must be a non-empty list of names")
    if not (isinstance(bits, list) and len(bits) == len(names)):
        raise ValueError(f"binary: config 'bits' must list one count per field ({len(names)})")
    if mode not in SCALES or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"binary: config needs scales in {SCALES} and a positive dim")
    expected = {f"{kind}.{i}" for i in range(len(names)) for kind in ("codes", "scales")}
    if set(tensors) != expected:
        raise ValueError(
            f"binary: tensors {sorted(set(tensors) ^ expected)[:4]} differ from the config's"
        )
    codes, scales = [], []
    for i, (name, b) in enumerate(zip(names, bits, strict=True)):
        c, s = tensors[f"codes.{i}"], tensors[f"scales.{i}"]
        if not (isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_BITS):
            raise ValueError(f"binary: field {name!r} has {b!r} bit-planes, not 1..{MAX_BITS}")
        rows = c.shape[0] if c.dim() == 3 else 0
        want_scales = (rows, b) if mode == "row" else (b,)
        if (
            c.dtype != torch.uint8
            or tuple(c.shape) != (rows, b, code_bytes(dim))
            or rows < 1
            or s.dtype != torch.float16
            or tuple(s.shape) != want_scales
        ):
            raise ValueError(
                f"binary: field {name!r} stores codes {c.dtype} {tuple(c.shape)} and scales "
                f"{s.dtype} {tuple(s.shape)}; {b} planes of dim {dim} with {mode} scales need "
                f"uint8 (rows, {b}, {code_bytes(dim)}) and float16 {want_scales}"
            )
        codes.append(c)
        scales.append(s)
    return names, dim, codes, scales


@register_serving(KIND)
class BinaryServing(nn.Module):
    """Serving side of ``binary``: each field one table of fbgemm's inference kernel, every
    looked-up id one row per plane (see :data:`DECODES`), ids range-checked first.

    ``resident_bytes`` is what the decoded tables hold in memory (the artifact's bytes are
    ``serve_bytes``; only ``decode="bits"`` holds no more than those).
    """

    def __init__(
        self, exported: ExportedEmbedding, decode: str = "bits", plane_dtype: str = PLANE_DTYPE
    ) -> None:
        super().__init__()
        if decode not in DECODES:
            raise ValueError(f"binary: decode must be one of {DECODES}, got {decode!r}")
        if plane_dtype not in _SPREAD:
            raise ValueError(f"binary: plane_dtype must be one of {sorted(_SPREAD)}")
        names, self.dim, codes, scales = checked_export(exported)
        self.decode = decode
        self.field_map = DirectMap(names)
        self.num_fields = len(names)
        self.check_ids = IdRangeCheck({n: c.shape[0] for n, c in zip(names, codes, strict=True)})
        if decode == "bits":
            for i, (c, s) in enumerate(zip(codes, scales, strict=True)):
                self.register_buffer(f"codes_{i}", c)
                self.register_buffer(f"scales_{i}", s.float())
            self.resident_bytes = sum(
                c.numel() + s.numel() * SCALE_BYTES for c, s in zip(codes, scales, strict=True)
            )
            return
        # Every field at the same width (a whole number of code bytes); columns past ``dim``
        # (zero bits: ``-Σ s``) are dropped after pooling.
        self.width = 8 * code_bytes(self.dim)
        specs, packed, self.planes = [], {}, []
        for name, c, s in zip(names, codes, scales, strict=True):
            n, b = c.shape[0], c.shape[1]
            exact = bool(s.float().abs().max() < 2**15)  # 2s stays finite in fp16
            as_planes = decode == "planes" or (decode == "auto" and b == 1 and exact)
            if as_planes and not exact:
                raise ValueError(
                    f"binary: field {name!r} has scales of 2^15 or more; "
                    "decode='bits' or 'rows' serves them"
                )
            if as_planes:
                spec = TableSpec(f"{name}.planes", n * b, self.width, plane_dtype)
                packed[spec.name] = plane_rows(c, s, plane_dtype)
            else:
                spec = TableSpec(f"{name}.rows", n, self.width, ROW_DTYPE)
                packed[spec.name] = decoded_rows(c, s, self.width)
            specs.append(spec)
            self.planes.append(b if as_planes else 1)
        self.resident_bytes = sum(t.serve_bytes for t in specs)
        # Rows are range-checked ids times their planes: fbgemm's own bounds pass is skipped.
        self.tables = ServeTables(
            specs,
            [Lookup(n, t.name, field=i) for i, (n, t) in enumerate(zip(names, specs, strict=True))],
            packed,
            check_bounds=False,
        )
        del packed
        self.index_dtype = torch.int32 if max(t.rows for t in specs) < 2**31 else torch.int64
        self.register_buffer(
            "_planes", torch.tensor(self.planes, dtype=self.index_dtype), persistent=False
        )
        uniform = len(set(self.planes)) == 1
        self._uniform_planes = self.planes[0] if uniform else None
        self.register_buffer(
            "_within", torch.arange(self.planes[0], dtype=self.index_dtype), persistent=False
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        mapped = self.field_map(features)
        if self.decode == "bits":
            n = self.num_fields
            return pooled_binary_lookup(
                mapped,
                [getattr(self, f"codes_{i}") for i in range(n)],
                [getattr(self, f"scales_{i}") for i in range(n)],
                self.dim,
            )
        self.check_ids(mapped)
        rows, offsets = self._plane_rows(mapped)
        pooled = self.tables.tbe(rows, offsets).view(-1, self.num_fields, self.width)
        return pooled if self.width == self.dim else pooled[..., : self.dim]

    def _plane_rows(self, mapped: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each id of a field with ``b`` plane rows -> rows ``id·b .. id·b + b-1``, in its bag
        (the kernel's sum pooling then adds the planes); other fields' ids pass unchanged."""
        values = mapped.values().to(self.index_dtype)
        offsets = mapped.offsets().to(self.index_dtype)
        planes = self._uniform_planes
        if planes == 1:
            return values, offsets
        if planes is not None:
            return (values.unsqueeze(1) * planes + self._within).view(-1), offsets * planes
        per_key = mapped.length_per_key()
        counts = torch.tensor(per_key)
        per_value = torch.repeat_interleave(self._planes, counts, output_size=values.numel())
        total = sum(c * b for c, b in zip(per_key, self.planes, strict=True))
        # Row = id·b + (position - first position of this id's rows).
        first = torch.cumsum(per_value, 0) - per_value
        rows = torch.repeat_interleave(values * per_value - first, per_value, output_size=total)
        rows += torch.arange(total, dtype=self.index_dtype)
        bags = torch.repeat_interleave(self._planes, mapped.stride())
        lengths = mapped.lengths().to(self.index_dtype) * bags
        return rows, torch.cat([offsets[:1], torch.cumsum(lengths, 0, dtype=self.index_dtype)])
