"""Hybrid methods: small fields in collisionless TorchRec tables, the others in one module.

Methods without physical rows (TT-Rec's cores, ROBE's hashed array, DHE's MLP) still want the
fields too small to benefit from compression kept as plain tables, like DLRM's
``--qr-threshold``. This module composes the two generically:

* a :class:`FieldModule` embeds its fields without tables (KJT of its fields -> ``[B, n, dim]``)
  and knows how to export and rebuild itself from a JSON config plus tensors;
* :class:`FieldRouter` splits the input KJT by key into the table fields and the module
  fields (``KeyedJaggedTensor.permute``, vectorised) and merges both outputs back into
  ``[B, F, dim]`` in field order;
* :class:`HybridMethod` is the training-side ``Compressor`` (tables through
  :class:`~compressors.core.storage.TrainTables`, so the trainer fuses them and DMP can shard them)
  and :class:`HybridServing` the serving side (tables through fbgemm's
  :class:`~compressors.core.storage.ServeTables`, the module rebuilt from its export).

Memory is exact by construction: ``serve_bytes`` is the sum of the exported tensors, the
tables counted by :class:`~compressors.core.storage.TableSpec` in fbgemm's row format.

Example (a method's constructor)::

    super().__init__(features, dim, budget_bytes)
    tables = collisionless_fields(features, dim, budget_bytes, threshold=200, max_share=0.25)
    rest = [f for i, f in enumerate(features) if i not in tables]
    self.assemble(tables, MyModule([f.name for f in rest], dim, ...))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import Compressor, ExportedEmbedding, FeatureSpec, MemoryReport
from compressors.core.hash64 import mix64, stable_salt
from compressors.core.storage import (
    Lookup,
    ServeTables,
    TableSpec,
    TrainTables,
    check_dtype,
    layout_from_config,
    pack_rows,
)

FIELD_MODULES: dict[str, type[FieldModule]] = {}
TABLE_PREFIX = "table."
MODULE_PREFIX = "module."
_INT63 = (1 << 63) - 1


def module_optimizer_state_bytes(params: Iterable[torch.Tensor], optimizer: str) -> int:
    """fp32 state ``optimizer`` keeps for ``params`` (see :meth:`FieldModule.train_bytes`)."""
    params = list(params)
    if optimizer == "adam":
        return sum(p.numel() for p in params) * 2 * 4
    if optimizer == "adagrad":
        return sum(p.numel() for p in params) * 4
    if optimizer == "rowwise_adagrad":
        return sum(p.shape[0] if p.dim() else 1 for p in params) * 4
    if optimizer == "sgd":
        return 0
    raise ValueError(
        f"unknown module optimizer {optimizer!r}; expected adam, adagrad, rowwise_adagrad or sgd"
    )


def register_field_module(cls: type[FieldModule]) -> type[FieldModule]:
    """Class decorator: lets :class:`HybridServing` rebuild modules of ``cls.kind``."""
    FIELD_MODULES[cls.kind] = cls
    return cls


# ---------------------------------------------------------------- hashing and pooling helpers
def premixed_salts(names: Sequence[str], chunks: int, seed: int, tag: str = "") -> torch.Tensor:
    """``[len(names), chunks]`` int64: ``mix64(stable_salt(tag + name, chunk, seed))``.

    Mixing the salts once lets :func:`hash_premixed` hash ``N x chunks`` values with one
    ``mix64`` pass; the result equals :func:`compressors.core.hash64.salted_hash` bit for bit.
    """
    raw = [[stable_salt(f"{tag}{n}", c, seed) for c in range(chunks)] for n in names]
    return mix64(torch.tensor(raw, dtype=torch.int64).view(len(names), chunks))


def hash_premixed(values: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """Non-negative 63-bit hashes ``salted_hash(values[:, None], salt)`` -> ``[N, chunks]``.

    ``mixed`` is ``[N, chunks]`` (per-value salts, already mixed) or broadcastable to it.
    """
    return mix64(values.to(torch.int64).unsqueeze(-1) ^ mixed) & _INT63


def take_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``source[index]`` (rows of ``source`` along dim 0, shaped ``index.shape + source.shape[1:]``)
    through ``index_select``, whose backward sums repeated indices in a fixed order.

    Advanced indexing's backward on CPU adds the gradients of repeated indices in parallel, in
    whatever order the threads reach them, so with two or more threads a step is not bitwise
    reproducible and a resumed run drifts from the uninterrupted one. Use this for every
    differentiable gather whose index repeats (a batch's values into its unique rows, codes
    into codebooks, fields into per-field parameters).
    """
    flat = source.index_select(0, index.reshape(-1))
    return flat.view(*index.shape, *source.shape[1:])


def pool_bags(rows: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
    """Sum-pools one row per value of ``features`` into ``[B, keys, dim]`` (EBC semantics).

    Values of a KJT are key-major, so bag ``k * B + b`` holds sample ``b`` of key ``k``;
    empty bags pool to zeros.
    """
    num_keys, batch = len(features.keys()), features.stride()
    lengths = features.lengths()
    # One-hot fields: every bag is its single row. Checked on the host only: on a GPU the
    # check would cost a device-to-host sync each step, and the sum below gives those rows.
    if (
        rows.shape[0] == lengths.numel()
        and lengths.device.type == "cpu"
        and bool(torch.all(lengths == 1))
    ):
        pooled = rows
    else:
        bags = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lengths.device),
            lengths,
            output_size=rows.shape[0],
        )
        pooled = rows.new_zeros(lengths.numel(), rows.shape[1]).index_add_(0, bags, rows)
    return pooled.view(num_keys, batch, -1).transpose(0, 1)


def collisionless_fields(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    threshold: int,
    max_share: float,
) -> list[int]:
    """Fields kept as full fp32 tables: at most ``threshold`` rows, smallest first, while
    their tables take at most ``max_share`` of the budget. Returned in field order."""
    kept, used = [], 0
    for i in sorted(range(len(features)), key=lambda i: (features[i].cardinality, i)):
        size = TableSpec("t", features[i].cardinality, dim).serve_bytes
        if features[i].cardinality > threshold or used + size > max_share * budget_bytes:
            break
        kept.append(i)
        used += size
    return sorted(kept)


# ---------------------------------------------------------------- the module protocol
class FieldModule(nn.Module):
    """Embeds its fields without tables: KJT of exactly its fields -> ``[B, n, dim]``.

    Subclasses set ``kind``, implement ``forward``, ``to_config`` and ``from_config``. The
    defaults export every parameter and buffer of the state dict (BatchNorm's batch counter
    excepted: eval mode never reads it), and count training memory as fp32 parameters with
    Adam's two moments plus the state dict's buffers. Non-persistent buffers are caches
    derived from the config (premixed salts) and are not counted.
    """

    kind: ClassVar[str] = ""
    #: the module reads a value only through 64-bit hashes of it (any int64 key works)
    hashes_values: ClassVar[bool] = False

    def __init__(self, fields: Sequence[str], dim: int) -> None:
        super().__init__()
        self.fields = list(fields)
        self.dim = dim

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        """JSON-able arguments that rebuild this module's structure (not its weights);
        subclasses extend it."""
        return {"fields": self.fields, "dim": self.dim}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FieldModule:
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach()
            for k, v in self.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }

    @classmethod
    def from_export(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FieldModule:
        module = cls.from_config(config)
        result = module.load_state_dict(tensors, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{cls.kind}: exported tensors do not fit the module "
                f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
        return module.eval()

    def serve_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.export_tensors().values())

    def train_bytes(self, optimizer: str = "adam") -> int:
        """fp32 weights, buffers and the state ``optimizer`` keeps for the weights (Adam: two
        moments per weight; Adagrad: one; row-wise Adagrad: one per first-dimension slice,
        :class:`compressors.core.optim.RowwiseAdagrad`; SGD: none)."""
        params = dict(self.named_parameters())
        state = self.state_dict()
        weights = sum(p.numel() * p.element_size() for p in params.values())
        buffers = sum(v.numel() * v.element_size() for k, v in state.items() if k not in params)
        return weights + buffers + module_optimizer_state_bytes(params.values(), optimizer)

    def memory_parts(self) -> dict[str, int]:
        """``serve_bytes`` broken down (one entry by default)."""
        return {self.kind: self.serve_bytes()}


# ---------------------------------------------------------------- routing
class FieldRouter(nn.Module):
    """Splits a KJT into table fields and module fields; merges their outputs in field order."""

    def __init__(
        self, fields: Sequence[str], table_fields: Sequence[str], module_fields: Sequence[str]
    ) -> None:
        super().__init__()
        if sorted(fields) != sorted([*table_fields, *module_fields]):
            raise ValueError("table and module fields must partition the fields")
        self.fields = list(fields)
        self.table_fields = list(table_fields)
        self.module_fields = list(module_fields)
        concat = [*table_fields, *module_fields]
        order = torch.tensor([concat.index(f) for f in fields], dtype=torch.int64)
        self.identity = concat == self.fields
        self.register_buffer("_order", order, persistent=False)
        self._perms: dict[tuple[str, ...], tuple[list[int], list[int]]] = {}

    def split(
        self, features: KeyedJaggedTensor
    ) -> tuple[KeyedJaggedTensor | None, KeyedJaggedTensor | None]:
        keys = tuple(features.keys())
        if keys not in self._perms:
            missing = set(self.fields) - set(keys)
            if missing:
                raise KeyError(f"input lacks sparse features {sorted(missing)}")
            self._perms[keys] = (
                [keys.index(f) for f in self.table_fields],
                [keys.index(f) for f in self.module_fields],
            )
        to_tables, to_module = self._perms[keys]
        return (
            features.permute(to_tables) if to_tables else None,
            features.permute(to_module) if to_module else None,
        )

    def merge(self, tables: torch.Tensor | None, module: torch.Tensor | None) -> torch.Tensor:
        """``tables [B, n_t * dim]`` and ``module [B, n_m, dim]`` -> ``[B, F, dim]``."""
        parts = []
        if tables is not None:
            parts.append(tables.view(tables.shape[0], len(self.table_fields), -1))
        if module is not None:
            parts.append(module)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out if self.identity else out.index_select(1, self._order)


def _table_layout(
    names: Sequence[str], cardinalities: Sequence[int], dim: int
) -> tuple[list[TableSpec], list[Lookup]]:
    tables = [TableSpec(f"t_{n}", c, dim) for n, c in zip(names, cardinalities, strict=True)]
    lookups = [Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)]
    return tables, lookups


# ---------------------------------------------------------------- training side
class HybridMethod(Compressor):
    """Base of the table-less methods: subclasses solve their split and module, then call
    :meth:`assemble`. Export kind = the method's ``name`` (serving: :class:`HybridServing`)."""

    def assemble(
        self,
        table_fields: Sequence[int],
        module: FieldModule | None,
        init_scale: float = 0.01,
        module_lr: float | None = None,
    ) -> None:
        """Builds the tables for ``table_fields`` (indices) and checks the budget.

        ``module_lr``: the module's own Adam learning rate (None: the trainer's dense one);
        under ``TrainConfig(module_optimizer="table")`` the tables' optimizer and lr instead.
        """
        self.module_lr = module_lr
        names = [self.features[i].name for i in table_fields]
        module_names = module.fields if module is not None else []
        self.router = FieldRouter(self.feature_names, names, module_names)
        self.table_specs, self.lookups = _table_layout(
            names, [self.features[i].cardinality for i in table_fields], self.dim
        )
        self.tables = (
            TrainTables(self.table_specs, self.lookups, init_scale=init_scale) if names else None
        )
        self.module = module
        self.check_budget(self.memory().serve_bytes, "the solved configuration")

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        to_tables, to_module = self.router.split(features)
        return self.router.merge(
            self.tables(to_tables) if self.tables is not None else None,
            self.module(to_module) if self.module is not None else None,
        )

    def hashed_fields(self) -> list[str]:
        return (
            list(self.module.fields)
            if self.module is not None and self.module.hashes_values
            else []
        )

    def optimizer_groups(self) -> list[dict[str, Any]]:
        # The module holds embedding parameters: the trainer gives them embedding L2 and, under
        # the fair-comparison protocol, the tables' optimizer family and learning rate.
        if self.module is None:
            return []
        return [
            {
                "params": list(self.module.parameters()),
                "optimizer": "adam",
                "lr": self.module_lr,
                "embedding": True,
            }
        ]

    def memory(self) -> MemoryReport:
        parts = {f"table.{t.name}": t.serve_bytes for t in self.table_specs}
        train = sum(t.train_bytes(self.table_optimizer) for t in self.table_specs)
        if self.module is not None:
            parts.update(self.module.memory_parts())
            train += self.module.train_bytes(self.module_optimizer)
        return MemoryReport(
            serve_bytes=sum(parts.values()),
            train_bytes=train,
            full_bytes=self.full_bytes,
            parts=parts,
        )

    def export(self) -> ExportedEmbedding:
        tensors: dict[str, torch.Tensor] = {}
        if self.tables is not None:
            weights = self.tables.weights()
            tensors.update(
                {
                    TABLE_PREFIX + t.name: pack_rows(weights[t.name], t.dtype)
                    for t in self.table_specs
                }
            )
        if self.module is not None:
            tensors.update(
                {MODULE_PREFIX + k: v.clone() for k, v in self.module.export_tensors().items()}
            )
        return ExportedEmbedding(
            kind=self.name,
            config={
                "method": self.name,
                "dim": self.dim,
                "fields": self.feature_names,
                "tables": [t.to_json() for t in self.table_specs],
                "lookups": [lk.to_json() for lk in self.lookups],
                "module": None
                if self.module is None
                else {"kind": self.module.kind, **self.module.to_config()},
            },
            tensors=tensors,
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {"table_fields": [t.name.removeprefix("t_") for t in self.table_specs]}

    def plan_details(self) -> dict[str, Any]:
        return {
            "tables": [t.to_json() for t in self.table_specs],
            "module": None
            if self.module is None
            else {"kind": self.module.kind, **self.module.to_config()},
        }

    def set_storage(self, dtype: str) -> None:
        """Serves the plain tables of the small fields at ``dtype`` (the module is unchanged)."""
        for t in self.table_specs:
            check_dtype(dtype, t.dim)
        self.table_specs = [replace(t, dtype=dtype) for t in self.table_specs]


# ---------------------------------------------------------------- serving side
class HybridServing(nn.Module):
    """Serves a :class:`HybridMethod` export: fbgemm tables + the rebuilt field module."""

    def __init__(self, exported: ExportedEmbedding) -> None:
        super().__init__()
        cfg = exported.config
        tables, lookups = layout_from_config(cfg)
        module_cfg = cfg["module"]
        module_fields = [] if module_cfg is None else module_cfg["fields"]
        self.router = FieldRouter(cfg["fields"], [lk.key for lk in lookups], module_fields)
        self.tables = (
            ServeTables(
                tables, lookups, {t.name: exported.tensors[TABLE_PREFIX + t.name] for t in tables}
            )
            if tables
            else None
        )
        self.module: FieldModule | None = None
        if module_cfg is not None:
            if module_cfg["kind"] not in FIELD_MODULES:
                raise ValueError(f"unknown field module {module_cfg['kind']!r}")
            self.module = FIELD_MODULES[module_cfg["kind"]].from_export(
                module_cfg,
                {
                    k[len(MODULE_PREFIX) :]: v
                    for k, v in exported.tensors.items()
                    if k.startswith(MODULE_PREFIX)
                },
            )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        to_tables, to_module = self.router.split(features)
        return self.router.merge(
            self.tables(to_tables) if self.tables is not None else None,
            self.module(to_module) if self.module is not None else None,
        )
