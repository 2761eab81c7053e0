"""Shared pieces of the pruning family: a trainable table whose rows can be masked or
reparameterised in the forward pass, the exact byte arithmetic of pruned tables, a row-remap
index map, and the ``pruned`` export that fbgemm serves.

**Training storage.** OptEmbed's row mask sends a straight-through gradient into the
embedding values through their L1 norm, PEP reparameterises every entry
(``sign(w)·relu(|w| − g(s))``) and DeepLight multiplies entries by a mask; none of these can
run inside fbgemm's fused TBE backward, which only ever sees pooled gradients. So
:class:`EntryTable` keeps all fields in one fp32 table (a buffer, field ``f`` owning rows
``[offset_f, offset_f + n_f)``), reads a batch's unique rows into a small leaf tensor, lets the
method transform them, pools them with ``embedding_bag`` and, after the optimizer step,
updates exactly those rows with the same optimiser family the fused tables use (row-wise
Adagrad by default; :class:`~compressors.precision.integer.SparseRowOptimizer`). It is one of
the trainer's :class:`~compressors.core.decay.EmbeddingRows`: stepped at the run's current
embedding lr and decayed by its embedding L2 like the fused tables. ``train_bytes`` counts the whole
fp32 table, its optimizer state and the masks: these methods need the full table while
training, and say so. The tables are buffers, not TorchRec tables, so training is
single-process (:func:`refuse_distributed`).

**Serving** (export kind ``pruned``, :class:`PrunedServing`). Each field is stored in the
cheapest form its pattern allows, and every byte is counted:

- ``dense``: all ``n_f`` rows at the field's dim ``d_f`` (no index bytes);
- ``rows``: only the kept rows at ``d_f`` plus a remap ``id -> kept row`` (``-1`` = pruned)
  in the smaller of two exactly counted forms: an array (int16 when the stored rows fit, else
  int32: 16-32 bits an id), or a **rank bitmap** — one keep bit per id, a uint8 count of the
  kept ids before each byte within its block of 64 and an int32 count before each block
  (2.5 bits an id); a kept id's row is its rank, the two counts plus the popcount of the bits
  below it in its byte (:func:`bitmap_lookup`: four gathers in int32 arithmetic; a 1.5-bit
  variant without the byte counts measured 20x slower). ``bench.py --only serving`` times
  the same kept rows (10% of 26 fields, batches of 4096, one thread) behind both forms: the
  bitmap's remap + fbgemm lookup runs at 0.73x the lookups/s of the array's, which runs at
  0.55x the unpruned table's (the remap's passes cost about what the kernel does). The
  bitmap is 6.4x smaller than an int16 remap, which at 10x compression of a 16-dim fp32
  table would take a third of the budget; any field of more than 10 ids uses it. The
  remapped ids go straight to fbgemm's int-N TBE, which skips ``-1`` indices (the
  convention of its own ``index_remapping``), so pruned ids read as zeros. With a per-field
  OOV vector (``FieldPlan.oov``) the field stores one more row, the vector, after its kept rows, and
  pruned ids remap to it instead of ``-1``: the same fbgemm path serves it, and its bytes are
  one row more (an array remap's width counts it);
- ``csr`` (entry-sparse tables): values + column indices per non-zero entry and the row
  pointers (:mod:`compressors.core.csr`: an int32 base per 64 rows + a 16-bit offset per
  row, 2.06 bytes a row); values at fp32, fp16 or int8 (int8:
  symmetric codes with one fp32 scale per field, ``max|v| / 127`` — 4 bytes a field, where a
  scale per row would cost 2 bytes a row on top of its pointer); served by a
  vectorised gather/scatter;
- ``empty``: every row pruned (and no OOV vector): zero bytes, reads zeros.

Table fields go through :class:`RemapMap` -> one ``IntNBitTableBatchedEmbeddingBagsCodegen``
(any storage dtype) -> :class:`~compressors.core.layout.Combiner`, which zero-pads a field
stored at ``d_f < D`` back to ``D``; CSR and empty fields through :class:`SparseFields`.

Example::

    plan = [FieldPlan("C1", 1000, "rows", dim=8, kept=120), FieldPlan("C2", 40, "dense", dim=16)]
    sum(p.serve_bytes("int8") for p in plan)
    exported = export_pruned("optembed", 16, plan, "int8", values, row_keep)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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
from compressors.core.decay import EmbeddingRows
from compressors.core.hybrid import FieldRouter
from compressors.core.layout import Combiner, IndexMap, register_index_map
from compressors.core.registry import register_serving
from compressors.core.storage import (
    BITS,
    Lookup,
    ServeTables,
    TableSpec,
    layout_from_config,
    pack_rows,
    row_bytes,
)
from compressors.precision.integer import SparseRowOptimizer

log = logging.getLogger(__name__)

PRUNED_KIND = "pruned"
INT16_MAX = 32767
FORMS = ("dense", "rows", "csr", "empty")
CSR_DTYPES = ("fp32", "fp16", "int8")
CSR_SCALE_BYTES = 4  # the fp32 scale of a field's int8 CSR values
INT8_MAX = 127
_CHUNK_ROWS = 1 << 18


RANK_BLOCK = 64  # ids per entry of a rank bitmap's directory
RANK_BLOCK_BYTES = 2 * (RANK_BLOCK // 8) + 4  # the block's bits, byte counts, int32 count
POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


# ---------------------------------------------------------------- byte arithmetic
def remap_bytes(rows: int, kept: int) -> int:
    """Bytes of an array remap of ``rows`` ids onto ``kept`` rows (int16 when it fits, else
    int32)."""
    return rows * (2 if kept <= INT16_MAX else 4)


def bitmap_bytes(rows: int) -> int:
    """Bytes of a rank bitmap over ``rows`` ids: the bits, a uint8 count per 8 ids and an
    int32 count per 64."""
    return -(-rows // RANK_BLOCK) * RANK_BLOCK_BYTES


def remap_form(rows: int, stored: int) -> str:
    """The smaller remap of ``rows`` ids onto ``stored`` rows: ``array`` or ``bitmap``."""
    return "bitmap" if bitmap_bytes(rows) < remap_bytes(rows, stored) else "array"


def index_bytes(rows: int, stored: int) -> int:
    """Bytes of the remap a ``rows`` field with ``stored`` table rows is served with."""
    return min(remap_bytes(rows, stored), bitmap_bytes(rows))


def csr_fixed_bytes(rows: int, dim: int, dtype: str) -> int:
    """The bytes of a CSR field that do not grow with its entries: its row pointers, and the
    field's scale when the values are int8."""
    return pointer_bytes(rows, dim) + (CSR_SCALE_BYTES if dtype == "int8" else 0)


def csr_entry_bytes(dim: int, dtype: str) -> int:
    """Bytes of one CSR entry: its value and its column index."""
    if dtype not in CSR_DTYPES:
        raise ValueError(f"no CSR form at {dtype} storage (CSR values are {list(CSR_DTYPES)})")
    return BITS[dtype] // 8 + column_bytes(dim)


def csr_bytes(rows: int, nnz: int, dim: int, dtype: str) -> int:
    """CSR of ``nnz`` entries: values + column indices, row pointers (and an int8 scale)."""
    return nnz * csr_entry_bytes(dim, dtype) + csr_fixed_bytes(rows, dim, dtype)


def min_dim(dtype: str) -> int:
    """The smallest dim whose rows fbgemm packs at ``dtype`` (even bytes for int-N rows)."""
    return {"fp32": 1, "fp16": 1, "int8": 2, "int4": 4, "int2": 8}[dtype]


def dim_choices(dim: int, dtype: str) -> list[int]:
    """Dims a field may be cut to at ``dtype`` (multiples of :func:`min_dim`, up to ``dim``)."""
    step = min_dim(dtype)
    choices = list(range(step, dim + 1, step))
    if not choices:
        raise ValueError(f"{dtype} storage needs dim >= {step}, got {dim}")
    return choices


@dataclass(frozen=True)
class FieldPlan:
    """How one field is served: ``form`` (see module docstring), dim, kept rows, entries, and
    whether its pruned ids read a stored OOV row (``oov``, ``rows`` form only)."""

    name: str
    rows: int
    form: str
    dim: int
    kept: int = 0
    nnz: int = 0
    oov: bool = False

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"field {self.name!r}: unknown form {self.form!r}")
        if self.oov and self.form != "rows":
            raise ValueError(f"field {self.name!r}: only the rows form stores an OOV row")

    @property
    def stored_rows(self) -> int:
        """Rows of the field's fbgemm table (kept rows, plus the OOV row)."""
        return self.rows if self.form == "dense" else self.kept + int(self.oov)

    def serve_bytes(self, dtype: str) -> int:
        if self.form == "dense":
            return self.rows * row_bytes(self.dim, dtype)
        if self.form == "rows":
            stored = self.stored_rows
            return stored * row_bytes(self.dim, dtype) + index_bytes(self.rows, stored)
        if self.form == "csr":
            return csr_bytes(self.rows, self.nnz, self.dim, dtype)
        return 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def row_plan(name: str, rows: int, kept: int, dim: int, oov: bool = False) -> FieldPlan:
    """The form of a row-pruned field: ``dense`` when nothing is pruned, ``empty`` when all
    (without an OOV vector), else ``rows`` (plus the OOV row when ``oov``)."""
    if kept >= rows:
        return FieldPlan(name, rows, "dense", dim, kept=rows)
    if kept == 0 and not oov:
        return FieldPlan(name, rows, "empty", dim)
    return FieldPlan(name, rows, "rows", dim, kept=kept, oov=oov)


def cheapest_entry_plan(
    name: str, rows: int, kept_rows: int, nnz: int, dim: int, dtype: str
) -> FieldPlan:
    """The cheapest honest form of an entry-sparse field (``kept_rows`` rows hold ``nnz``)."""
    options = [row_plan(name, rows, kept_rows, dim)]
    if dtype in CSR_DTYPES and 0 < nnz:
        options.append(FieldPlan(name, rows, "csr", dim, kept=kept_rows, nnz=nnz))
    return min(options, key=lambda p: p.serve_bytes(dtype))


def max_csr_entries(features: Sequence[FeatureSpec], dim: int, budget: int, dtype: str) -> int:
    """The most non-zero entries whose CSR export fits ``budget`` (a bound every cheaper
    per-field form then meets too)."""
    fixed = sum(csr_fixed_bytes(f.cardinality, dim, dtype) for f in features)
    return (budget - fixed) // csr_entry_bytes(dim, dtype)


# ---------------------------------------------------------------- training storage
def refuse_distributed(method: str) -> None:
    """These tables are plain buffers: under DMP they would be replicated and drift apart."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"{method}: its masked tables train in a single process only (they are not "
            "TorchRec tables DMP can shard); train it without torchrun"
        )


def row_optimizer(options: dict[str, Any]) -> str:
    """The optimizer of a method's row table: its ``optimizer`` option, else the run's table
    optimizer (``table_optimizer`` in a plan's context), else fbgemm's default."""
    return options.get("optimizer") or options.get("table_optimizer") or "rowwise_adagrad"


class EntryTable(EmbeddingRows, nn.Module):
    """All fields in one fp32 table; the forward applies a per-row transform before pooling.

    ``forward(kjt, transform)`` returns ``[B, F, D]``; ``transform(rows, weight)`` maps the
    batch's unique table rows and their values (a leaf that collects gradients while
    training) to the values to pool. :meth:`step` updates those rows after the optimizer step.
    ``optimizer`` None follows the run's table optimizer (:meth:`use_optimizer`).
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        optimizer: str | None = None,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__()
        self.names = [f.name for f in features]
        self.cards = [f.cardinality for f in features]
        self.dim = dim
        offsets = np.concatenate([[0], np.cumsum(self.cards)]).astype(np.int64)
        self.rows = int(offsets[-1])
        self.register_buffer("_offsets", torch.from_numpy(offsets[:-1].copy()), persistent=False)
        self.register_buffer("_ends", torch.from_numpy(offsets[1:].copy()), persistent=False)
        weight = torch.empty(self.rows, dim)
        for start in range(0, self.rows, _CHUNK_ROWS):
            weight[start : start + _CHUNK_ROWS].uniform_(-init_scale, init_scale)
        self.register_buffer("weight", weight)
        self.follows_run = optimizer is None
        self.optimizer = SparseRowOptimizer(optimizer or "rowwise_adagrad", self.rows, dim)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def offsets(self) -> list[int]:
        return self._offsets.tolist()

    def field_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The field of each table row."""
        return torch.searchsorted(self._ends, rows, right=True)

    def field_slice(self, f: int) -> slice:
        start = int(self._offsets[f])
        return slice(start, start + self.cards[f])

    def _check(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        if keys == self.names:
            return features
        missing = set(self.names) - set(keys)
        if missing:
            raise KeyError(f"input lacks sparse features {sorted(missing)}")
        return features.permute([keys.index(k) for k in self.names])

    def forward(
        self,
        features: KeyedJaggedTensor,
        transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        rows, inverse, offsets = self.locate(features)
        weight = self.weight[rows]
        if self.training and torch.is_grad_enabled():
            weight.requires_grad_()
            self._pending = (rows, weight)
        return self.pool(inverse, transform(rows, weight), offsets)

    def locate(
        self, features: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, inverse, offsets)``: the batch's unique table rows, each id's index into
        them and the bags' offsets — what :meth:`pool` needs to pool any values of those rows
        (a search scoring many masks of one batch looks it up once)."""
        features = self._check(features)
        counts = torch.tensor(features.length_per_key(), device=self.weight.device)
        fields = torch.repeat_interleave(torch.arange(len(self.names)), counts)
        ids = features.values() + self._offsets[fields]
        rows, inverse = torch.unique(ids, return_inverse=True)
        if self.decay is not None:  # lazily decayed rows brought up to date before a read
            self.decay.touch({"weight": rows})
        return rows, inverse, features.offsets()

    def pool(
        self, inverse: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        """``[B, F, D]``: sum-pools ``values`` (one per unique row) into the located bags."""
        pooled = F.embedding_bag(inverse, values, offsets, mode="sum", include_last_offset=True)
        return pooled.view(len(self.names), -1, self.dim).transpose(0, 1)

    @torch.no_grad()
    def step(self, lr: float) -> torch.Tensor | None:
        """Applies the sparse optimizer to the rows the last training forward read;
        returns those rows (None when nothing was pending)."""
        pending, self._pending = self._pending, None
        if pending is None or pending[1].grad is None:
            return None
        rows, weight = pending
        self.weight[rows] = self.optimizer.step(rows, weight.detach(), weight.grad, lr)
        return rows

    def step_rows(self, lr: float) -> None:
        self.step(lr)

    def use_optimizer(self, kind: str) -> None:
        if self.follows_run and kind != self.optimizer.kind:
            self.optimizer = SparseRowOptimizer(kind, self.rows, self.dim)

    def train_bytes(self) -> int:
        return self.weight.numel() * 4 + self.optimizer.nbytes

    def decay_weights(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def row_norms(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """L1 norm of every row (of ``values`` when given, e.g. masked values)."""
        self.flush_decay()
        source = self.weight if values is None else values
        return torch.cat(
            [
                source[s : s + _CHUNK_ROWS].abs().sum(1)
                for s in range(0, max(self.rows, 1), _CHUNK_ROWS)
            ]
        )


# ---------------------------------------------------------------- index map
@register_index_map
class RemapMap(IndexMap):
    """Per field an optional id -> row remap (``-1``: pruned; fbgemm's TBE skips it): an array
    (``remap.<f>``, int16 or int32), or a rank bitmap (``bits.<f>``, ``counts.<f>``,
    ``ranks.<f>``; :func:`build_bitmap`).

    Array fields map field by field over the batch's contiguous slices (one gather each).
    The bitmaps are held as one concatenation (each field's whole 64-id blocks at an offset)
    and every bitmap field's ids map in one :func:`bitmap_lookup`: per field it would be ~20
    small ops, which on 26 fields cost 7x the array gathers; a single concatenation of the
    arrays too, with boolean selects, measured 10x slower than their loop."""

    kind = "remap"

    def __init__(
        self,
        features: Sequence[str],
        remaps: dict[str, torch.Tensor],
        bitmaps: dict[str, RankBitmap] | None = None,
    ) -> None:
        super().__init__(features, features)
        bitmaps = bitmaps or {}
        self.remapped = [f for f in features if f in remaps]
        self.bitmapped = [f for f in features if f in bitmaps]
        self._bitmap_config = {f: bitmaps[f].to_config() for f in self.bitmapped}
        for i, f in enumerate(self.features):
            if f in remaps:
                self.register_buffer(f"_remap{i}", remaps[f], persistent=False)
        ordered = [bitmaps[f] for f in self.bitmapped]
        self._bitmap_slots = [self.features.index(f) for f in self.bitmapped]
        self._bitmap_ids = [b.bits.numel() * 8 for b in ordered]  # padded ids per field
        starts = np.cumsum([0] + self._bitmap_ids)[:-1]

        def cat(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(tensors) if tensors else torch.zeros(0, dtype=dtype)

        small = {
            "_bm_start": torch.as_tensor(starts, dtype=torch.int64),
            "_bm_rows": torch.tensor([b.rows for b in ordered], dtype=torch.int64),
            "_bm_pruned": torch.tensor([b.pruned_to for b in ordered], dtype=torch.int64),
            "_bits": cat([b.bits for b in ordered], torch.uint8),
            "_counts": cat([b.counts for b in ordered], torch.uint8),
            "_ranks": cat([b.ranks for b in ordered], torch.int32),
        }
        for name, tensor in small.items():
            self.register_buffer(name, tensor, persistent=False)

    def _map_bitmaps(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        ids = [parts[i] for i in self._bitmap_slots]
        # Bounds per field first (one min/max pass each): out of range, an id would read
        # the padding bits ("pruned") or the next field's bits; checked before the narrowing
        # below could wrap a huge id into range.
        empty = torch.zeros(2, dtype=torch.int64)
        bounds = torch.stack([torch.stack(p.aminmax()) if len(p) else empty for p in ids])
        bad = (bounds[:, 0] < 0) | (bounds[:, 1] >= self._bm_rows)
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            low, high = bounds[k].tolist()
            raise ValueError(
                f"field {self.bitmapped[k]!r}: id {low if low < 0 else high} outside "
                f"[0, {int(self._bm_rows[k])})"
            )
        sizes = torch.tensor([len(p) for p in ids])
        # int32 arithmetic (half the memory traffic of int64) when the concatenation fits.
        dtype = torch.int32 if self._bits.numel() * 8 < 2**31 else torch.int64
        mapped = bitmap_lookup(
            torch.cat(ids).to(dtype) + torch.repeat_interleave(self._bm_start.to(dtype), sizes),
            self._bits,
            self._counts,
            self._ranks,
            torch.repeat_interleave(self._bm_pruned.to(dtype), sizes),
        )
        return list(torch.split(mapped, sizes.tolist()))

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        features = self.check_keys(features)
        if not (self.remapped or self.bitmapped):
            return features
        parts = list(torch.split(features.values(), features.length_per_key()))
        for i, f in enumerate(self.features):
            if f in self.remapped:
                parts[i] = getattr(self, f"_remap{i}")[parts[i]].long()  # out of range: error
        if self.bitmapped:
            for i, mapped in zip(self._bitmap_slots, self._map_bitmaps(parts), strict=True):
                parts[i] = mapped
        return KeyedJaggedTensor(
            keys=self.lookup_keys,
            values=torch.cat(parts),
            lengths=features.lengths(),
            stride=features.stride(),
        )

    def to_config(self) -> dict[str, Any]:
        return {
            **super().to_config(),
            "remapped": self.remapped,
            "bitmaps": dict(self._bitmap_config),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            f"remap.{f}": getattr(self, f"_remap{i}")
            for i, f in enumerate(self.features)
            if f in self.remapped
        }
        for k, f in enumerate(self.bitmapped):
            start, ids = int(self._bm_start[k]), self._bitmap_ids[k]
            byte, block = start // 8, start // RANK_BLOCK
            out[f"bits.{f}"] = self._bits[byte : byte + ids // 8]
            out[f"counts.{f}"] = self._counts[byte : byte + ids // 8]
            out[f"ranks.{f}"] = self._ranks[block : block + ids // RANK_BLOCK]
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RemapMap:
        bitmaps = {
            f: RankBitmap.from_config(
                f, c, tensors[f"bits.{f}"], tensors[f"counts.{f}"], tensors[f"ranks.{f}"]
            )
            for f, c in config.get("bitmaps", {}).items()
        }
        return cls(
            config["features"], {f: tensors[f"remap.{f}"] for f in config["remapped"]}, bitmaps
        )


def build_remap(keep: torch.Tensor, oov: bool = False) -> torch.Tensor:
    """``keep`` (bool per id) -> id -> kept row; pruned ids -> ``-1``, or with ``oov`` the row
    after the kept ones (the OOV row). int16 when the stored rows fit, else int32."""
    kept = int(keep.sum())
    remap = torch.full((len(keep),), kept if oov else -1, dtype=torch.int64)
    remap[keep] = torch.arange(kept)
    return remap.to(torch.int16 if kept + int(oov) <= INT16_MAX else torch.int32)


def _directory(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A bitmap's counts: uint8 kept ids before each byte within its block, int32 kept ids
    before each block."""
    per_byte = POPCOUNT[bits.long()].view(-1, RANK_BLOCK // 8)
    counts = (torch.cumsum(per_byte, 1) - per_byte).to(torch.uint8).view(-1)
    per_block = per_byte.sum(1)
    return counts, (torch.cumsum(per_block, 0) - per_block).to(torch.int32)


class RankBitmap(nn.Module):
    """One field's id -> row map as keep bits + a rank directory (module docstring).

    ``bits``: uint8, 8 bytes per 64 ids (id ``i`` is bit ``i % 8`` of byte ``i // 8``; padding
    bits 0); ``counts``: uint8 per byte, the kept ids before it in its block; ``ranks``:
    int32 per block, the kept ids before it. A kept id maps to its rank, a pruned one to
    ``pruned_to`` (``-1``, or the OOV row after the kept rows)."""

    def __init__(
        self,
        rows: int,
        bits: torch.Tensor,
        counts: torch.Tensor,
        ranks: torch.Tensor,
        pruned_to: int,
    ) -> None:
        super().__init__()
        self.rows, self.pruned_to = rows, pruned_to
        self.register_buffer("bits", bits, persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("ranks", ranks, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel():
            low, high = ids.aminmax()
            if int(low) < 0 or int(high) >= self.rows:  # padding bits would read "pruned"
                bad = int(low) if int(low) < 0 else int(high)
                raise ValueError(f"id {bad} outside [0, {self.rows}) of a pruned field")
        return bitmap_lookup(ids, self.bits, self.counts, self.ranks, self.pruned_to)

    def to_config(self) -> dict[str, int]:
        return {"rows": self.rows, "pruned_to": self.pruned_to}

    @classmethod
    def from_config(
        cls,
        field: str,
        config: dict[str, Any],
        bits: torch.Tensor,
        counts: torch.Tensor,
        ranks: torch.Tensor,
    ) -> RankBitmap:
        """Checks the bitmap whole (sizes, padding, every count, the pruned target) before
        serving from it: a forged one is refused in one line."""
        rows, pruned_to = int(config["rows"]), int(config["pruned_to"])
        blocks = -(-rows // RANK_BLOCK)
        size = blocks * RANK_BLOCK // 8

        def require(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"remap bitmap of field {field!r}: {what}")

        require(rows >= 1, f"rows must be positive, got {rows}")
        for name, t, dtype, n in (
            ("bits", bits, torch.uint8, size),
            ("counts", counts, torch.uint8, size),
            ("ranks", ranks, torch.int32, blocks),
        ):
            require(
                t.dtype == dtype and tuple(t.shape) == (n,),
                f"{name} are {t.dtype} {list(t.shape)}, expected {dtype} [{n}]",
            )
        want_counts, want_ranks = _directory(bits)
        require(
            torch.equal(counts, want_counts) and torch.equal(ranks, want_ranks),
            "its counts do not match its bits",
        )
        pad = torch.arange(rows, blocks * RANK_BLOCK)
        require(not bool(((bits[pad >> 3].long() >> (pad & 7)) & 1).any()), "padding bits are set")
        kept = int(POPCOUNT[bits.long()].sum())
        require(pruned_to in (-1, kept), f"pruned ids map to {pruned_to}, not -1 or {kept}")
        return cls(rows, bits, counts, ranks, pruned_to)


def build_bitmap(keep: torch.Tensor, oov: bool = False) -> RankBitmap:
    """``keep`` (bool per id) -> a :class:`RankBitmap`; pruned ids -> ``-1``, or with ``oov``
    the row after the kept ones."""
    rows = len(keep)
    blocks = -(-rows // RANK_BLOCK)
    padded = torch.zeros(blocks * RANK_BLOCK, dtype=torch.int64)
    padded[:rows] = keep.to(torch.int64)
    bits = (padded.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)
    counts, ranks = _directory(bits)
    return RankBitmap(rows, bits, counts, ranks, int(keep.sum()) if oov else -1)


# For byte value v and bit b: the set bits of v below b when bit b is set, else -1 (pruned).
_RANK_IN_BYTE = torch.tensor(
    [
        bin(v & ((1 << b) - 1)).count("1") if v >> b & 1 else -1
        for v in range(256)
        for b in range(8)
    ],
    dtype=torch.int32,
)


def bitmap_lookup(
    ids: torch.Tensor,
    bits: torch.Tensor,
    counts: torch.Tensor,
    ranks: torch.Tensor,
    pruned_to: int | torch.Tensor,
) -> torch.Tensor:
    """Rows of ``ids`` (int32 or int64, in range) under a rank bitmap: the block's count, plus
    the byte's count within the block, plus the set bits below the id in its byte (one table
    lookup that also says whether the id is kept); pruned ids -> ``pruned_to`` (one value, or
    one per id). Rows come back as int32 (``ranks``' dtype): the arithmetic stays in the ids'
    width, and int32 halves the memory traffic of these memory-bound passes."""
    byte = ids >> 3
    own = bits.index_select(0, byte).to(ids.dtype)
    within = _RANK_IN_BYTE.index_select(0, (own << 3) | (ids & 7))
    rank = ranks.index_select(0, ids >> 6) + counts.index_select(0, byte) + within
    if not isinstance(pruned_to, torch.Tensor):
        return torch.where(within >= 0, rank, torch.tensor(pruned_to, dtype=rank.dtype))
    return torch.where(within >= 0, rank, pruned_to.to(rank.dtype))


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
    ``oov_vector(f)`` the ``[D]`` vector its pruned ids read (fields whose plan has ``oov``)."""
    table_plans = [p for p in plans if p.form in ("dense", "rows")]
    sparse_plans = [p for p in plans if p.form in ("csr", "empty")]
    tensors: dict[str, torch.Tensor] = {}
    tables, lookups, remaps, bitmaps = [], [], {}, {}
    for f, p in enumerate(plans):
        if p.form in ("dense", "rows"):
            values = field_values(f)[:, : p.dim]
            if p.form == "rows":
                keep = row_keep(f)
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
                    values = torch.cat([values, oov_vector(f)[: p.dim].unsqueeze(0)])
            spec = TableSpec(f"t_{p.name}", values.shape[0], p.dim, dtype)
            tables.append(spec)
            lookups.append(Lookup(p.name, spec.name, field=len(lookups)))
            tensors[f"table.{spec.name}"] = pack_rows(values, dtype)
        elif p.form == "csr":
            csr = pack_csr(field_values(f), dtype)
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
