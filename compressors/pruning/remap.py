"""Index maps of pruned tables: ``id -> stored row`` (``-1``: pruned; fbgemm's TBE skips it).

Two exactly counted forms (:mod:`compressors.pruning.bytes` picks the smaller per field):
an array (:func:`build_remap`; int16 when the stored rows fit, else int32), or a **rank
bitmap** (:func:`build_bitmap`, :class:`RankBitmap`) — one keep bit per id, a uint8 count of
the kept ids before each byte within its block of 64 and an int32 count before each block
(2.5 bits an id); a kept id's row is its rank, the two counts plus the popcount of the bits
below it in its byte (:func:`bitmap_lookup`: four gathers in int32 arithmetic). With an OOV
row, pruned ids map to the row after the kept ones instead of ``-1``. :class:`RemapMap` is the
:class:`~compressors.core.layout.IndexMap` a ``pruned`` export serves its table fields
through. Measured speeds of both forms: ``docs/methods/pruned-serving.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.layout import IndexMap, register_index_map
from compressors.pruning.bytes import INT16_MAX, RANK_BLOCK

POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


@register_index_map
class RemapMap(IndexMap):
    """Per field an optional id -> row remap (``-1``: pruned; fbgemm's TBE skips it): an array
    (``remap.<f>``, int16 or int32), or a rank bitmap (``bits.<f>``, ``counts.<f>``,
    ``ranks.<f>``; :func:`build_bitmap`).

    Array fields map field by field over the batch's contiguous slices (one gather each).
    The bitmaps are held as one concatenation (each field's whole 64-id blocks at an offset)
    and every bitmap field's ids map in one :func:`bitmap_lookup` (per field, ~20 small ops a
    field cost far more; the measured figures are in ``docs/methods/pruned-serving.md``)."""

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
