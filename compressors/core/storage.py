"""Physical tables: trained as a TorchRec ``EmbeddingBagCollection``, served by fbgemm.

Training storage is an EBC (so DMP can shard it, and the trainer can swap it for a fused
``FusedEmbeddingBagCollection`` whose optimizer runs inside fbgemm's backward). Serving storage
is one ``IntNBitTableBatchedEmbeddingBagsCodegen`` holding every table at its own dtype.

Serving bytes follow fbgemm's inference row format (CPU row alignment 1): fp32 ``4·d``, fp16
``2·d``, intN ``d·N/8 + 4`` (an fp16 scale and an fp16 bias lead each row).

Example::

    tables = [TableSpec("t0", rows=1000, dim=16, dtype="int8")]
    train = TrainTables(tables, [Lookup("C1", "t0")])
    packed = {t.name: pack_rows(w, t.dtype) for t, w in zip(tables, train.weights().values())}
    serve = ServeTables(tables, [Lookup("C1", "t0")], packed)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torchrec.optim as trec_optim
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    BoundsCheckMode,
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from compressors.core.decay import EmbeddingRows, RowDecay
from compressors.core.spill import spilled

BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}
SCALE_BIAS_BYTES = 4
_SPARSE_TYPES = {
    "fp32": SparseType.FP32,
    "fp16": SparseType.FP16,
    "int8": SparseType.INT8,
    "int4": SparseType.INT4,
    "int2": SparseType.INT2,
}
TABLE_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
}
#: Table optimizers outside fbgemm's CPU fused kernels: the tables stay an ordinary EBC with
#: sparse gradients and PyTorch's lazy ``SparseAdam`` steps the rows a batch read.
SPARSE_TABLE_OPTIMIZERS = {"adam": torch.optim.SparseAdam}
TABLE_OPTIMIZER_NAMES = (*TABLE_OPTIMIZERS, *SPARSE_TABLE_OPTIMIZERS)


def check_dtype(dtype: str, dim: int) -> None:
    if dtype not in BITS:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose from {sorted(BITS)}")
    if (dim * BITS[dtype]) % 8:
        raise ValueError(f"{dtype} storage needs dim * bits divisible by 8, got dim={dim}")
    if dtype.startswith("int") and (dim * BITS[dtype]) % 16:
        # fbgemm's row-wise quantiser aligns the fp16 scale/bias after the codes.
        raise ValueError(
            f"{dtype} storage needs an even number of code bytes per row (dim * bits divisible "
            f"by 16 for fbgemm's kernels), got dim={dim}"
        )


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one served row in fbgemm's inference format."""
    check_dtype(dtype, dim)
    payload = dim * BITS[dtype] // 8
    return payload + (SCALE_BIAS_BYTES if dtype.startswith("int") else 0)


def optimizer_state_bytes(rows: int, dim: int, optimizer: str) -> int:
    """Optimizer state a table optimizer keeps for one fp32 table (Adam: both moments; its
    step counts are a few bytes per table and not counted)."""
    per_row = {"sgd": 0, "rowwise_adagrad": 1, "adagrad": dim, "adam": 2 * dim}
    if optimizer not in per_row:
        raise ValueError(f"unknown table optimizer {optimizer!r}; choose from {sorted(per_row)}")
    return rows * per_row[optimizer] * 4


@dataclass(frozen=True)
class TableSpec:
    """One physical table: ``rows × dim`` trained in fp32, served at ``dtype``."""

    name: str
    rows: int
    dim: int
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.rows < 1 or self.dim < 1:
            raise ValueError(f"table {self.name!r}: rows and dim must be positive")
        check_dtype(self.dtype, self.dim)

    @property
    def serve_bytes(self) -> int:
        return self.rows * row_bytes(self.dim, self.dtype)

    def train_bytes(self, optimizer: str) -> int:
        return self.rows * self.dim * 4 + optimizer_state_bytes(self.rows, self.dim, optimizer)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Lookup:
    """One pooled lookup: rows keyed ``key`` are read from ``table`` and pooled.

    The pooled vector lands in ``field``'s output columns ``[start, start + table dim)``;
    term-0 lookups tile every field, a lookup of term ``t > 0`` is combined into the same
    columns (QR's second table). Storage only reads ``key`` and ``table``.
    """

    key: str
    table: str
    field: int = 0
    start: int = 0
    term: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def layout_from_config(config: dict[str, Any]) -> tuple[list[TableSpec], list[Lookup]]:
    """The tables and lookups an export config lists (``to_json`` of each), rebuilt."""
    return [TableSpec(**t) for t in config["tables"]], [Lookup(**lk) for lk in config["lookups"]]


def pack_rows(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """fp32 rows -> the exact tensor an artifact stores for ``dtype``.

    fp32/fp16 stay float tensors; intN become uint8 rows ``[scale fp16 | bias fp16 | codes]``
    (fbgemm's row-wise asymmetric min/max quantisation, codes packed low bits first).
    """
    check_dtype(dtype, weight.shape[1])
    weight = weight.detach().float().contiguous()
    if dtype == "fp32":
        return weight.clone()
    if dtype == "fp16":
        return weight.half()
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(weight, BITS[dtype])
    # fbgemm's quantiser appends scale/bias; the inference TBE expects them first.
    return torch.cat([fused[:, -SCALE_BIAS_BYTES:], fused[:, :-SCALE_BIAS_BYTES]], dim=1)


def unpack_rows(packed: torch.Tensor, dtype: str) -> torch.Tensor:
    """Inverse of :func:`pack_rows` (dequantised to fp32)."""
    if dtype in ("fp32", "fp16"):
        return packed.float()
    fused = torch.cat([packed[:, SCALE_BIAS_BYTES:], packed[:, :SCALE_BIAS_BYTES]], dim=1)
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused.contiguous(), BITS[dtype])


def _column_order(lookups: Sequence[Lookup]) -> list[Lookup]:
    """Lookups grouped by table (tables in first-use order), as an EBC is configured."""
    order = list(dict.fromkeys(lk.table for lk in lookups))
    return [lk for t in order for lk in lookups if lk.table == t]


def _validate(tables: Sequence[TableSpec], lookups: Sequence[Lookup]) -> None:
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate table names in {names}")
    keys = [lk.key for lk in lookups]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate lookup keys")
    unknown = {lk.table for lk in lookups} - set(names)
    if unknown:
        raise ValueError(f"lookups read unknown tables {sorted(unknown)}")
    unused = set(names) - {lk.table for lk in lookups}
    if unused:
        raise ValueError(f"tables {sorted(unused)} are never looked up")


class TrainTables(EmbeddingRows, nn.Module):
    """Trainable fp32 tables behind one ``EmbeddingBagCollection``.

    ``forward`` takes a KJT keyed by lookup keys (in ``lookups`` order) and returns
    ``[B, Σ dim]`` with each lookup's pooled vector in ``lookups`` order.
    """

    def __init__(
        self, tables: Sequence[TableSpec], lookups: Sequence[Lookup], init_scale: float = 0.01
    ) -> None:
        super().__init__()
        _validate(tables, lookups)
        self.tables = list(tables)
        self.lookups = list(lookups)
        emitted = _column_order(lookups)
        by_name = {t.name: t for t in tables}
        init = functools.partial(nn.init.uniform_, a=-init_scale, b=init_scale)
        configs = [
            EmbeddingBagConfig(
                name=name,
                num_embeddings=by_name[name].rows,
                embedding_dim=by_name[name].dim,
                feature_names=[lk.key for lk in emitted if lk.table == name],
                init_fn=init,
            )
            for name in dict.fromkeys(lk.table for lk in emitted)
        ]
        self.ebc: nn.Module = EmbeddingBagCollection(tables=configs)
        self._keys = [lk.key for lk in lookups]
        self._perms: dict[tuple[str, ...], torch.Tensor | None] = {}
        self._direct: _DirectLookup | None = None
        self.decay: RowDecay | None = None
        self.sparse_optimizer: torch.optim.Optimizer | None = None

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if self.decay is not None and self.decay.last:
            self.decay.touch(self._rows_by_table(features))
        if self._direct is not None:
            out, keys, widths = self._direct(features)
        else:
            pooled = self.ebc(features)
            out, keys, widths = pooled.values(), tuple(pooled.keys()), pooled.length_per_key()
        # EBCs emit lookups grouped by table, and a sharded EBC in its own sharding order:
        # reorder by key into lookup order (cached per emitted order; usually a no-op).
        if keys not in self._perms:
            perm = _permutation(keys, widths, self._keys)
            self._perms[keys] = None if perm is None else perm.to(out.device)  # copied once
        perm = self._perms[keys]
        return out if perm is None else out.index_select(1, perm.to(out.device))

    def weights(self) -> dict[str, torch.Tensor]:
        """Each table's fp32 weights (views), by table name."""
        return {t.name: self.ebc.embedding_bags[t.name].weight for t in self.tables}

    def decay_weights(self) -> dict[str, torch.Tensor]:
        # Decoupled L2 on every table (see compressors.core.decay); set after fuse(): the
        # decay holds the fused weights.
        return self.weights()

    def _rows_by_table(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        table_of = {lk.key: lk.table for lk in self.lookups}
        rows: dict[str, list[torch.Tensor]] = {}
        values = torch.split(features.values(), features.length_per_key())
        for key, ids in zip(features.keys(), values, strict=True):
            rows.setdefault(table_of[key], []).append(ids)
        return {t: torch.cat(parts) for t, parts in rows.items()}

    def fuse(self, optimizer: str, lr: float, **kwargs: Any) -> None:
        """Swaps the EBC for a fused one whose optimizer runs in fbgemm's backward.

        Weights are carried over; the fused tables stop being ordinary autograd parameters.
        An optimizer fbgemm's CPU kernels lack (Adam) keeps the EBC and steps its rows with
        a lazy sparse optimizer instead (:meth:`step_rows`).
        """
        if optimizer not in TABLE_OPTIMIZER_NAMES:
            choices = sorted(TABLE_OPTIMIZER_NAMES)
            raise ValueError(f"unknown table optimizer {optimizer!r}; choose from {choices}")
        if optimizer in SPARSE_TABLE_OPTIMIZERS:
            if isinstance(self.ebc, FusedEmbeddingBagCollection):
                raise ValueError(f"tables already fused with another optimizer than {optimizer}")
            if self.sparse_optimizer is None:
                for bag in self.ebc.embedding_bags.values():
                    bag.sparse = True  # gradients of the rows a batch read only
                self.reset_optimizer(optimizer, lr)
            return
        if isinstance(self.ebc, FusedEmbeddingBagCollection):
            return
        old = self.weights()
        # fbgemm's kernel for the weights' device: its CPU one, or fbgemm-gpu's CUDA one.
        device = next(iter(old.values())).device if old else torch.device("cpu")
        configs = self.ebc.embedding_bag_configs()
        # The old tables wait in a file while the fused ones are allocated: never both whole
        # in memory at once.
        with spilled(old) as mapped:
            del old
            fused = FusedEmbeddingBagCollection(
                tables=configs,
                optimizer_type=TABLE_OPTIMIZERS[optimizer],
                optimizer_kwargs={"lr": lr, **kwargs},
                device=device,
            )
            # A chunk of rows at a time: a method with one big table (binary, the pruning
            # family) would otherwise hold it whole from the file beside the fused one.
            mapped.copy_into({n: b.weight for n, b in fused.embedding_bags.items()})
        self.ebc = fused
        self._direct = _DirectLookup.of(fused)

    def reset_optimizer(self, optimizer: str, lr: float) -> None:
        """A fresh sparse optimizer (no state) for unfused tables."""
        params = list(self.ebc.parameters())
        self.sparse_optimizer = SPARSE_TABLE_OPTIMIZERS[optimizer](params, lr=lr)

    def step_rows(self, lr: float) -> None:
        """Unfused tables: the sparse optimizer steps the rows the last backward reached."""
        opt = self.sparse_optimizer
        if opt is None:
            return
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)

    def table_optimizer(self) -> Any:
        """The tables' optimizer, for checkpoints and lr changes: fbgemm's fused one or the
        sparse one."""
        if self.sparse_optimizer is not None:
            return self.sparse_optimizer
        return self.ebc.fused_optimizer()


class _DirectLookup:
    """Calls a fused EBC's one fbgemm kernel on the KJT as it comes.

    ``FusedEmbeddingBagCollection.forward`` splits the KJT into one jagged tensor per feature
    (``to_dict``), concatenates them back and recomputes the offsets on every step: a Python
    loop over features and three copies of the ids, for nothing when the KJT's keys are
    already in the kernel's feature order (then its values and offsets are exactly the
    kernel's input). Only KJTs in another key order are permuted first.
    """

    def __init__(self, op: nn.Module, order: list[str], widths: list[int]) -> None:
        self.op = op
        self.order = order
        self.keys = tuple(order)
        self.widths = widths
        self._perms: dict[tuple[str, ...], list[int]] = {}

    @classmethod
    def of(cls, fused: FusedEmbeddingBagCollection) -> _DirectLookup | None:
        # One kernel for all tables (one optimizer, location and pooling), unweighted.
        ops = getattr(fused, "_emb_modules", None)
        groups = getattr(fused, "_key_to_tables", None)
        if ops is None or groups is None or len(ops) != 1 or fused.is_weighted():
            return None
        tables = next(iter(groups.values()))
        order = [f for t in tables for f in t.feature_names]
        widths = [t.embedding_dim for t in tables for _ in t.feature_names]
        return cls(ops[0], order, widths)

    def __call__(
        self, features: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, tuple[str, ...], list[int]]:
        keys = features.keys()
        if keys != self.order:
            if tuple(keys) not in self._perms:
                self._perms[tuple(keys)] = [keys.index(k) for k in self.order]
            features = features.permute(self._perms[tuple(keys)])
        return self.op(features.values(), features.offsets(), None), self.keys, self.widths


def _permutation(
    emitted: Sequence[str], widths: Sequence[int], wanted: Sequence[str]
) -> torch.Tensor | None:
    """Columns that reorder pooled lookups from ``emitted`` key order to ``wanted`` order."""
    if list(emitted) == list(wanted):
        return None
    spans, start = {}, 0
    for key, width in zip(emitted, widths, strict=True):
        spans[key] = (start, start + width)
        start += width
    return torch.cat([torch.arange(*spans[k]) for k in wanted])


class ServeTables(nn.Module):
    """The same tables packed for fbgemm's int-N inference kernel (one TBE for all tables).

    ``check_bounds=False`` skips fbgemm's per-call bounds check of every index (a pass that
    costs about as much as an fp32 lookup): only for callers that produce rows already known
    to be in range.
    """

    def __init__(
        self,
        tables: Sequence[TableSpec],
        lookups: Sequence[Lookup],
        packed: Mapping[str, torch.Tensor],
        check_bounds: bool = True,
    ) -> None:
        super().__init__()
        _validate(tables, lookups)
        # Sizes come from an artifact's manifest: check them against the stored tensors
        # before fbgemm allocates anything from them.
        for t in tables:
            src = packed.get(t.name)
            expected = t.rows * row_bytes(t.dim, t.dtype)
            got = None if src is None else src.numel() * src.element_size()
            if got != expected or src.dim() == 0 or src.shape[0] != t.rows:
                raise ValueError(
                    f"table {t.name!r}: {t.rows} rows of dim {t.dim} ({t.dtype}) need "
                    f"{expected} bytes, the stored tensor has "
                    f"{'none' if src is None else f'{got} bytes, shape {tuple(src.shape)}'}"
                )
        index = {t.name: i for i, t in enumerate(tables)}
        self.tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[
                (t.name, t.rows, t.dim, _SPARSE_TYPES[t.dtype], EmbeddingLocation.HOST)
                for t in tables
            ],
            feature_table_map=[index[lk.table] for lk in lookups],
            device="cpu",
            pooling_mode=PoolingMode.SUM,
            output_dtype=SparseType.FP32,
            row_alignment=1,
            bounds_check_mode=BoundsCheckMode.WARNING if check_bounds else BoundsCheckMode.NONE,
        )
        self.tbe.initialize_weights()
        for t, (dest, _, _) in zip(
            tables, self.tbe.split_embedding_weights_with_scale_bias(0), strict=True
        ):
            src = packed[t.name]
            expected = (t.rows, row_bytes(t.dim, t.dtype))
            as_bytes = src.contiguous().view(torch.uint8).view(t.rows, -1)
            if tuple(as_bytes.shape) != expected:
                raise ValueError(
                    f"table {t.name!r}: packed as {tuple(as_bytes.shape)} bytes, "
                    f"expected {expected}"
                )
            dest.copy_(as_bytes)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.tbe(features.values().int(), features.offsets().int())
