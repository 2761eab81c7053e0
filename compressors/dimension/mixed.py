"""Mixed-dimension tables: per (field, frequency block) sub-tables of their own width.

Shared by the dimension-search methods. Every (field, block) lookup is stored in one of these
*forms*, each with exactly counted bytes:

- ``full``: a dense sub-table of width ``dim`` (no extra tensor);
- ``columns``: a dense sub-table holding only the block's surviving columns, plus the column
  numbers (one byte each for ``dim <= 256``); the pooled vector is scattered back into them
  (DNIS, structured survivors);
- ``projection``: a dense sub-table of width ``d < dim`` and an fp32 ``dim × d`` projection
  (MDE, AutoDim);
- ``csr``: the surviving entries of a block whose survivors are unstructured, as CSR (row
  pointers as :mod:`compressors.core.csr` stores them, column numbers, values at fp32 or
  fp16; served from the stored tensors as they are) — chosen where it is smaller;
- ``none``: nothing survives; the block reads zero.

Dense sub-tables of every width are served together by one fbgemm
``IntNBitTableBatchedEmbeddingBagsCodegen`` (tables of different dims in one TBE) at the
method's storage dtype; CSR blocks are looked up with a few vectorised torch ops.

:class:`ProjectedBlocks` is the training side of the ``projection``/``full`` forms (MDE and
AutoDim's retrain): TorchRec tables per (field, block), and the projections applied per field
as one batched matmul.

Example::

    blocks = ProjectedBlocks(features, 16, bounds, dims, storage="fp32")
    emb = blocks(kjt)                           # [B, F, 16]
    exported = blocks.export("mde")             # kind "mixed_dims"
    MixedDimServing(exported)(kjt)              # the same [B, F, 16]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import ExportedEmbedding, FeatureSpec
from compressors.core.csr import (
    POINTER_KEYS,
    column_bytes,
    pack_entries,
    pointer_bytes,
    pool_entries,
)
from compressors.core.registry import register_serving
from compressors.core.storage import (
    BITS,
    Lookup,
    ServeTables,
    TableSpec,
    TrainTables,
    pack_rows,
    row_bytes,
)
from compressors.dimension.blocks import BlockMap, block_ranges, router_bytes

MIXED_KIND = "mixed_dims"
FORMS = ("full", "columns", "projection", "csr", "none")


def csr_value_dtype(storage: str) -> torch.dtype | None:
    """CSR values keep fp32 or fp16; integer storage has no CSR form (row-wise scales)."""
    return {"fp32": torch.float32, "fp16": torch.float16}.get(storage)


def dense_bytes(rows: int, width: int, storage: str) -> int:
    return rows * row_bytes(width, storage) if width else 0


def csr_bytes(rows: int, nnz: int, dim: int, storage: str) -> int:
    dtype = csr_value_dtype(storage)
    if dtype is None:
        raise ValueError(f"no CSR form at {storage} storage")
    value = torch.finfo(dtype).bits // 8
    return pointer_bytes(rows, dim) + nnz * (column_bytes(dim) + value)


def pack_csr_block(kept: torch.Tensor, values: torch.Tensor, storage: str) -> dict:
    """A block's surviving entries (``kept`` bool ``[rows, dim]``) as CSR tensors."""
    structure, data = pack_entries(kept, values)
    packed = {f"csr_{k}": v for k, v in structure.items()}
    packed["csr_values"] = data.to(csr_value_dtype(storage))
    return packed


def padded_width(width: int, storage: str) -> int:
    """The smallest width >= ``width`` that ``storage`` can pack: whole bytes, and for the
    integer formats an even number of payload bytes (fbgemm's row-wise quantiser needs it)."""
    bits = BITS[storage]
    step = 16 // math.gcd(16, bits) if storage.startswith("int") else 8 // math.gcd(8, bits)
    return -(-width // step) * step


def train_width(width: int) -> int:
    """The width a block trains at: fbgemm's training TBE needs a multiple of 4."""
    return -(-width // 4) * 4


def projection_bytes(dim: int, width: int) -> int:
    return 0 if width >= dim else dim * width * 4


# ---------------------------------------------------------------- serving
class MixedDimServing(nn.Module):
    """Serves an export of kind ``mixed_dims`` (see the module docstring)."""

    def __init__(self, exported: ExportedEmbedding) -> None:
        super().__init__()
        cfg = exported.config
        t = exported.tensors
        prefix = "index_map."
        self.router = BlockMap.from_config(
            cfg["index_map"], {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}
        )
        self.dim, self.num_fields = cfg["dim"], cfg["num_fields"]
        keys = self.router.lookup_keys
        dense, src, dst, start = [], [], [], 0
        self.projections: list[tuple[int, int, int, torch.Tensor]] = []
        # (lookup index, field, pointers, cols, values), all as stored: resident = serve_bytes
        self.csr: list[tuple[int, int, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]] = []
        tables, lookups, packed = [], [], {}
        for spec in cfg["lookups"]:
            key, form, f, width = spec["key"], spec["form"], spec["field"], spec["width"]
            if form not in FORMS:
                raise ValueError(f"mixed_dims: lookup {key!r} has unknown form {form!r}")
            if form == "csr":
                pointers = {k: t[f"csr_{k}.{key}"] for k in POINTER_KEYS if f"csr_{k}.{key}" in t}
                self.csr.append(
                    (keys.index(key), f, pointers, t[f"csr_cols.{key}"], t[f"csr_values.{key}"])
                )
                continue
            if form == "none":
                continue
            tables.append(TableSpec(key, spec["rows"], width, spec["dtype"]))
            lookups.append(Lookup(key, key))
            packed[key] = t[f"table.{key}"]
            dense.append(keys.index(key))
            if form == "projection":
                self.projections.append((start, start + width, f, t[f"projection.{key}"].float()))
            else:
                cols = torch.arange(width) if form == "full" else t[f"columns.{key}"].long()[:width]
                src.append(torch.arange(start, start + len(cols)))
                dst.append(cols + f * self.dim)
            start += width
        self.dense_index = dense
        self.tables = ServeTables(tables, lookups, packed) if tables else None
        self._src = torch.cat(src) if src else torch.zeros(0, dtype=torch.int64)
        self._dst = torch.cat(dst) if dst else torch.zeros(0, dtype=torch.int64)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        mapped = self.router(features)
        batch = mapped.stride()
        out = torch.zeros(batch, self.num_fields * self.dim)
        if self.tables is not None:
            pooled = self.tables(mapped.permute(self.dense_index))
            out.index_add_(1, self._dst, pooled.index_select(1, self._src))
            for a, b, f, proj in self.projections:
                out[:, f * self.dim : (f + 1) * self.dim] += pooled[:, a:b] @ proj.T
        for index, f, pointers, cols, values in self.csr:
            jagged = mapped[mapped.keys()[index]]
            part = pool_entries(jagged.values(), jagged.lengths(), pointers, cols, values, self.dim)
            out[:, f * self.dim : (f + 1) * self.dim] += part
        return out.view(batch, self.num_fields, self.dim)


register_serving(MIXED_KIND)(MixedDimServing)


def mixed_config(
    method: str,
    dim: int,
    router: BlockMap,
    lookups: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "method": method,
        "dim": dim,
        "num_fields": len(router.features),
        "index_map": router.to_config(),
        "lookups": lookups,
        **(extra or {}),
    }


# ---------------------------------------------------------------- projected blocks (training)
class ProjectedBlocks(nn.Module):
    """Per (field, block) TorchRec tables of width ``dims[f][b]``, projected back to ``dim``.

    A block at the full ``dim`` is used as is (no projection), as DLRM's ``PrEmbeddingBag``.
    The projections of a field run as one batched matmul over its blocks' pooled vectors.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        bounds: Sequence[Sequence[int]],
        dims: Sequence[Sequence[int]],
        storage: str,
        init_scale: float,
    ) -> None:
        super().__init__()
        self.dim, self.storage = dim, storage
        names = [f.name for f in features]
        self.bounds = [list(b) for b in bounds]
        self.dims = [list(d) for d in dims]
        self.router = BlockMap(names, self.bounds, relative=True)
        tables, lookups = [], []
        index = 0
        for f, (b, d) in enumerate(zip(self.bounds, self.dims, strict=True)):
            for (start, stop), width in zip(block_ranges(b), d, strict=True):
                key = self.router.lookup_keys[index]
                # fbgemm's training kernels need widths in multiples of 4: a narrower block
                # trains a padded table whose extra columns are never read (nor exported).
                tables.append(TableSpec(f"t_{key}", stop - start, train_width(width)))
                lookups.append(Lookup(key, f"t_{key}", field=f))
                index += 1
        self.table_specs = tables
        self.tables = TrainTables(tables, lookups, init_scale=init_scale)
        # Pooled columns -> a padded [B, F, K] (K = widest field's total width), then
        # [B, F, K] @ [F, K, dim]; the matrix holds projections and identity blocks.
        fields = len(names)
        widest = max(sum(d) for d in self.dims)
        pooled_width = sum(train_width(w) for d in self.dims for w in d)
        gather = torch.full((fields * widest,), pooled_width, dtype=torch.int64)
        proj_at, ident_at, chunks, src = [], [], [], 0
        for f, d in enumerate(self.dims):
            k0 = 0
            for width in d:
                pos = f * widest + k0 + torch.arange(width)
                gather[pos] = src + torch.arange(width)
                if width >= dim:
                    ident_at.append(pos * dim + torch.arange(width))
                else:
                    proj_at.append((pos.unsqueeze(1) * dim + torch.arange(dim)).reshape(-1))
                    bound = 1 / math.sqrt(width)  # nn.Linear's default init
                    chunks.append(torch.empty(width * dim).uniform_(-bound, bound))
                k0 += width
                src += train_width(width)
        self.widest = widest
        self.register_buffer("_gather", gather, persistent=False)
        self.register_buffer(
            "_proj_at",
            torch.cat(proj_at) if proj_at else torch.zeros(0, dtype=torch.int64),
            persistent=False,
        )
        identity = torch.zeros(fields * widest * dim)
        if ident_at:
            identity[torch.cat(ident_at)] = 1.0
        self.register_buffer("_identity", identity, persistent=False)
        # Every projection, flattened as [width, dim] blocks (the transposes of Linear weights).
        self.projections = nn.Parameter(torch.cat(chunks) if chunks else torch.zeros(0))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.tables(self.router(features))
        batch = pooled.shape[0]
        padded = torch.cat([pooled, pooled.new_zeros(batch, 1)], dim=1).index_select(
            1, self._gather
        )
        matrix = self._identity.index_put((self._proj_at,), self.projections)
        fields = len(self.dims)
        matrix = matrix.view(fields, self.widest, self.dim)
        return torch.einsum("bfk,fkd->bfd", padded.view(batch, fields, self.widest), matrix)

    def lookup_projections(self) -> list[torch.Tensor | None]:
        """Per lookup, its ``[dim, width]`` projection (None at full width)."""
        out, at = [], 0
        for d in self.dims:
            for width in d:
                if width >= self.dim:
                    out.append(None)
                    continue
                n = width * self.dim
                out.append(self.projections[at : at + n].detach().view(width, self.dim).T)
                at += n
        return out

    def serve_bytes(self) -> int:
        return projected_serve_bytes(self.bounds, self.dims, self.dim, self.storage)

    def train_bytes(self, optimizer: str) -> int:
        tables = sum(t.train_bytes(optimizer) for t in self.table_specs)
        return tables + self.projections.numel() * 4 * 3  # fp32 weights + Adam's two moments

    def export(self, method: str, extra: dict[str, Any] | None = None) -> ExportedEmbedding:
        weights = self.tables.weights()
        tensors = {f"index_map.{k}": v for k, v in self.router.tensors().items()}
        specs = []
        lookup_fields = self.router.lookup_fields
        widths = [w for d in self.dims for w in d]
        for key, table, proj, f, width in zip(
            self.router.lookup_keys,
            self.table_specs,
            self.lookup_projections(),
            lookup_fields,
            widths,
            strict=True,
        ):
            form = "full" if proj is None else "projection"
            specs.append(
                {
                    "key": key,
                    "field": f,
                    "form": form,
                    "rows": table.rows,
                    "width": width,
                    "dtype": self.storage,
                }
            )
            tensors[f"table.{key}"] = pack_rows(weights[table.name][:, :width], self.storage)
            if proj is not None:
                tensors[f"projection.{key}"] = proj.contiguous().clone()
        return ExportedEmbedding(
            kind=MIXED_KIND,
            config=mixed_config(method, self.dim, self.router, specs, extra),
            tensors=tensors,
        )


def projected_serve_bytes(
    bounds: Sequence[Sequence[int]], dims: Sequence[Sequence[int]], dim: int, storage: str
) -> int:
    """Exact serving bytes of a projected mixed-dimension layout (arithmetic only)."""
    total = router_bytes(bounds)
    for b, d in zip(bounds, dims, strict=True):
        for (start, stop), width in zip(block_ranges(b), d, strict=True):
            total += dense_bytes(stop - start, width, storage) + projection_bytes(dim, width)
    return total
