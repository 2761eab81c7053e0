"""The ``pruned`` export and its serving module, :class:`PrunedServing`.

Table fields (``dense`` and ``rows``, :mod:`compressors.pruning.bytes`) go through
:class:`~compressors.pruning.remap.RemapMap` -> one ``IntNBitTableBatchedEmbeddingBagsCodegen``
(any storage dtype) -> :class:`~compressors.core.layout.Combiner`, which zero-pads a field
stored at ``d_f < D`` back to ``D``; the remapped ids go straight to fbgemm's int-N TBE, which
skips ``-1`` indices (the convention of its own ``index_remapping``), so pruned ids read as
zeros. CSR and empty fields go through :class:`SparseFields` (a vectorised gather/scatter).

Example::

    exported = export_pruned("optembed", 16, plans, "int8", values, row_keep)
    PrunedServing(exported)(kjt)  # [B, F * 16]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import ExportedEmbedding
from compressors.core.csr import POINTER_KEYS, pack_entries, pool_entries
from compressors.core.hybrid import FieldRouter
from compressors.core.layout import Combiner
from compressors.core.registry import register_serving
from compressors.core.storage import Lookup, ServeTables, TableSpec, layout_from_config, pack_rows
from compressors.pruning.bytes import INT8_MAX, FieldPlan, csr_entry_bytes, remap_form
from compressors.pruning.remap import RemapMap, build_bitmap, build_remap

PRUNED_KIND = "pruned"


# ---------------------------------------------------------------- CSR and empty fields
class SparseFields(nn.Module):
    """CSR (and empty) fields: KJT of exactly these fields -> ``[B, n, D]``."""

    def __init__(self, plans: Sequence[FieldPlan], dim: int, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.plans = list(plans)
        self.dim = dim
        self._pointer_keys: dict[int, list[str]] = {}
        for i, p in enumerate(self.plans):
            if p.form == "csr":
                self.register_buffer(f"_values{i}", tensors[f"csr.{p.name}.values"])
                self.register_buffer(f"_cols{i}", tensors[f"csr.{p.name}.cols"])
                # int32 pointers (wide rows, or exports before the split form), or bases +
                # offsets (compressors.core.csr)
                keys = [k for k in POINTER_KEYS if f"csr.{p.name}.{k}" in tensors]
                self._pointer_keys[i] = keys
                for k in keys:
                    self.register_buffer(f"_{k}{i}", tensors[f"csr.{p.name}.{k}"])
                scale = tensors.get(f"csr.{p.name}.scale")  # int8 values only
                if scale is None:
                    scale = torch.ones(1)
                self.register_buffer(f"_scale{i}", scale, persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        batch = features.stride()
        lengths = features.lengths().view(len(self.plans), batch)
        parts = torch.split(features.values(), features.length_per_key())
        out = []
        for i, (p, ids) in enumerate(zip(self.plans, parts, strict=True)):
            if p.form != "csr":
                out.append(torch.zeros(batch, self.dim))
                continue
            pointers = {k: getattr(self, f"_{k}{i}") for k in self._pointer_keys[i]}
            out.append(
                pool_entries(
                    ids,
                    lengths[i],
                    pointers,
                    getattr(self, f"_cols{i}"),
                    getattr(self, f"_values{i}"),
                    self.dim,
                    getattr(self, f"_scale{i}"),
                )
            )
        return torch.stack(out, dim=1)


def pack_csr(values: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """A field's ``[n, D]`` values (zeros pruned) -> CSR tensors at ``dtype`` (int8: codes
    and the field's fp32 scale; an entry whose code rounds to 0 stays an entry)."""
    csr_entry_bytes(values.shape[1], dtype)  # refuses a dtype without a CSR form
    packed, data = pack_entries(values != 0, values)
    if dtype == "int8":
        peak = float(data.abs().max()) if data.numel() else 0.0
        scale = torch.tensor([peak / INT8_MAX if peak > 0 else 1.0], dtype=torch.float32)
        packed["values"] = torch.round(data / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        packed["scale"] = scale
    else:
        packed["values"] = data if dtype == "fp32" else data.half()
    return packed


# ---------------------------------------------------------------- export and serving
def export_pruned(
    method: str,
    dim: int,
    plans: Sequence[FieldPlan],
    dtype: str,
    field_values: Callable[[int], torch.Tensor],
    row_keep: Callable[[int], torch.Tensor],
    oov_vector: Callable[[int], torch.Tensor] | None = None,
) -> ExportedEmbedding:
    """The ``pruned`` export of ``plans``; ``field_values(f)`` are field ``f``'s ``[n_f, D]``
    values as the trained model reads them, ``row_keep(f)`` its kept rows (bool),
    ``oov_vector(f)`` the ``[D]`` vector its pruned ids read (fields whose plan has ``oov``).
    They may live on any device; the artifact is packed on the host."""
    table_plans = [p for p in plans if p.form in ("dense", "rows")]
    sparse_plans = [p for p in plans if p.form in ("csr", "empty")]
    tensors: dict[str, torch.Tensor] = {}
    tables, lookups, remaps, bitmaps = [], [], {}, {}
    for f, p in enumerate(plans):
        if p.form in ("dense", "rows"):
            values = field_values(f)[:, : p.dim].cpu()
            if p.form == "rows":
                keep = row_keep(f).cpu()
                if int(keep.sum()) != p.kept:
                    raise RuntimeError(f"{method}: field {p.name!r} keeps {int(keep.sum())} rows")
                if remap_form(p.rows, p.stored_rows) == "bitmap":
                    bitmaps[p.name] = build_bitmap(keep, p.oov)
                else:
                    remaps[p.name] = build_remap(keep, p.oov)
                values = values[keep]
                if p.oov:
                    if oov_vector is None:
                        raise RuntimeError(f"{method}: field {p.name!r} has no OOV vector")
                    values = torch.cat([values, oov_vector(f)[: p.dim].cpu().unsqueeze(0)])
            spec = TableSpec(f"t_{p.name}", values.shape[0], p.dim, dtype)
            tables.append(spec)
            lookups.append(Lookup(p.name, spec.name, field=len(lookups)))
            tensors[f"table.{spec.name}"] = pack_rows(values, dtype)
        elif p.form == "csr":
            csr = pack_csr(field_values(f).cpu(), dtype)
            if csr["values"].numel() != p.nnz:
                raise RuntimeError(
                    f"{method}: field {p.name!r} has {csr['values'].numel()} entries"
                )
            tensors.update({f"csr.{p.name}.{k}": v for k, v in csr.items()})
    index_map = RemapMap([p.name for p in table_plans], remaps, bitmaps)
    tensors.update({f"index_map.{k}": v for k, v in index_map.tensors().items()})
    return ExportedEmbedding(
        kind=PRUNED_KIND,
        config={
            "method": method,
            "dim": dim,
            "fields": [p.name for p in plans],
            "dtype": dtype,
            "plans": [p.to_json() for p in plans],
            "index_map": index_map.to_config(),
            "tables": [t.to_json() for t in tables],
            "lookups": [lk.to_json() for lk in lookups],
            "sparse_fields": [p.name for p in sparse_plans],
        },
        tensors=tensors,
    )


@register_serving(PRUNED_KIND)
class PrunedServing(nn.Module):
    """Serves a ``pruned`` export: remap -> fbgemm int-N TBE -> zero-padding combiner for the
    table fields, :class:`SparseFields` for CSR and empty fields, merged in field order."""

    def __init__(self, exported: ExportedEmbedding) -> None:
        super().__init__()
        cfg = exported.config
        plans = [FieldPlan(**p) for p in cfg["plans"]]
        tables, lookups = layout_from_config(cfg)
        table_fields = [lk.key for lk in lookups]
        sparse = [p for p in plans if p.name in set(cfg["sparse_fields"])]
        self.router = FieldRouter(cfg["fields"], table_fields, [p.name for p in sparse])
        self.tables = self.index_map = self.combiner = None
        if tables:
            prefix = "index_map."
            self.index_map = RemapMap.from_config(
                cfg["index_map"],
                {k[len(prefix) :]: v for k, v in exported.tensors.items() if k.startswith(prefix)},
            )
            self.tables = ServeTables(
                tables, lookups, {t.name: exported.tensors[f"table.{t.name}"] for t in tables}
            )
            self.combiner = Combiner(
                lookups, [t.dim for t in tables], len(tables), cfg["dim"], op="sum"
            )
        self.sparse = SparseFields(sparse, cfg["dim"], exported.tensors) if sparse else None

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        to_tables, to_sparse = self.router.split(features)
        tables = None
        if self.tables is not None:
            tables = self.combiner(self.tables(self.index_map(to_tables)))
            tables = tables.reshape(tables.shape[0], -1)
        return self.router.merge(tables, self.sparse(to_sparse) if self.sparse else None)
