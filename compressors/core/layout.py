"""Index maps and combiners: the first and last stages of a table-based method.

An *index map* turns a KJT of field ids into a KJT of table rows, one key per lookup
(``Lookup`` in ``storage.py``). It is shared verbatim by training and serving, so exported
predictions use exactly the rows training used. A *combiner* turns the pooled lookups back
into ``[B, F, dim]``: every field's ``dim`` columns are filled by its term-0 lookups
(concatenated at their ``start``), and further terms are summed or multiplied in (QR).
Columns no term-0 lookup covers read zero (a field stored at fewer dims is zero-padded back to
``dim``; with ``op="sum"``, lookups of later terms may fill them, e.g. one term per
frequency block when a value is looked up in exactly one of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.storage import Lookup

INDEX_MAPS: dict[str, type[IndexMap]] = {}


def register_index_map(cls: type[IndexMap]) -> type[IndexMap]:
    INDEX_MAPS[cls.kind] = cls
    return cls


class IndexMap(nn.Module):
    """Field ids -> rows of physical tables. Subclasses set ``kind`` and implement the rest."""

    kind: ClassVar[str] = ""

    def __init__(self, features: Sequence[str], lookup_keys: Sequence[str]) -> None:
        super().__init__()
        self.features = list(features)
        self.lookup_keys = list(lookup_keys)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        """JSON-able parameters that rebuild this map together with :meth:`tensors`."""
        return {"kind": self.kind, "features": self.features, "lookup_keys": self.lookup_keys}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the map needs at serving time (counted in ``serve_bytes``)."""
        return {}

    def hashed_fields(self) -> list[str]:
        """Fields every lookup of which hashes the value (see ``Compressor.hashed_fields``)."""
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> IndexMap:
        raise NotImplementedError

    def check_tables(self, rows: dict[str, int], lookups: Sequence[Lookup]) -> None:
        """Serving: refuses (``ValueError``) tables of ``rows`` (by name) that this map's
        rows would read past; only maps whose rows come from stored tensors check."""

    def check_fields(self, cardinalities: dict[str, int]) -> None:
        """Serving: refuses (``ValueError``) a map built for other fields or cardinalities
        than the model's; only maps whose config states per-field sizes check."""

    def check_keys(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Returns ``features`` with keys in this map's field order (permuting if needed)."""
        keys = features.keys()
        if keys == self.features:
            return features
        missing = set(self.features) - set(keys)
        if missing:
            raise KeyError(f"input lacks sparse features {sorted(missing)}")
        return features.permute([keys.index(k) for k in self.features])


def field_index(features: KeyedJaggedTensor) -> torch.Tensor:
    """For every value of ``features``, the position of its key (vectorised)."""
    device = features.values().device
    counts = torch.tensor(features.length_per_key(), device=device)
    # output_size: no device-to-host sync to size the result.
    return torch.repeat_interleave(
        torch.arange(len(counts), device=device), counts, output_size=features.values().numel()
    )


class IdRangeCheck:
    """Refuses ids outside ``[0, cardinality)`` of their field, in one vectorised pass.

    Out-of-range ids would otherwise be zeroed by fbgemm (with only a C++ log line) or hashed
    silently by hashing methods; this names the field and the offending value instead.
    """

    def __init__(self, cardinality: dict[str, int]) -> None:
        self.cardinality = dict(cardinality)
        self._limits: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}

    def __call__(self, features: KeyedJaggedTensor) -> None:
        values = features.values()
        if values.numel() == 0 or values.is_meta:  # meta tensors hold no ids to check
            return
        keys = tuple(features.keys())
        key = (keys, values.device)
        if key not in self._limits:
            unknown = [k for k in keys if k not in self.cardinality]
            if unknown:
                raise ValueError(
                    f"unknown sparse fields {unknown}; expected {list(self.cardinality)}"
                )
            self._limits[key] = torch.tensor(
                [self.cardinality[k] for k in keys], dtype=values.dtype, device=values.device
            )
        per_key = features.length_per_key()
        limits = self._limits[key]
        if len(set(per_key)) == 1:
            # Every field has as many ids (single-hot batches): one pass over a [F, n] view.
            low, high = values.view(len(keys), -1).aminmax(dim=1)
            if bool(((low < 0) | (high >= limits)).any()):
                self._report(values, keys, torch.tensor(per_key, device=values.device))
            return
        lengths = torch.tensor(per_key, device=values.device)
        limit = torch.repeat_interleave(limits, lengths, output_size=values.numel())
        if bool(((values < 0) | (values >= limit)).any()):
            self._report(values, keys, lengths)

    def _report(self, values: torch.Tensor, keys: tuple[str, ...], lengths: torch.Tensor) -> None:
        limit = torch.repeat_interleave(self._limits[(keys, values.device)], lengths)
        i = int(((values < 0) | (values >= limit)).nonzero()[0, 0])
        field = int(torch.searchsorted(lengths.cumsum(0), i, right=True))
        raise ValueError(
            f"sparse field {keys[field]!r} has id {int(values[i])} outside "
            f"[0, {self.cardinality[keys[field]]})"
        )


@register_index_map
class DirectMap(IndexMap):
    """Each field reads its own table at row = id (collisionless, per-field tables)."""

    kind = "direct"

    def __init__(self, features: Sequence[str]) -> None:
        super().__init__(features, features)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return self.check_keys(features)

    @classmethod
    def from_config(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DirectMap:
        return cls(config["features"])


@register_index_map
class OffsetMap(IndexMap):
    """Fields share one table; field ``f`` owns rows ``[offset_f, offset_f + n_f)``."""

    kind = "offset"

    def __init__(self, features: Sequence[str], offsets: Sequence[int]) -> None:
        super().__init__(features, features)
        self.offsets = [int(o) for o in offsets]
        self.register_buffer(
            "_offsets", torch.tensor(self.offsets, dtype=torch.int64), persistent=False
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        features = self.check_keys(features)
        values = features.values() + self._offsets[field_index(features)]
        return KeyedJaggedTensor(
            keys=self.lookup_keys,
            values=values,
            lengths=features.lengths(),
            stride=features.stride(),
        )

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "offsets": self.offsets}

    @classmethod
    def from_config(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> OffsetMap:
        return cls(config["features"], config["offsets"])


class Combiner(nn.Module):
    """Pooled lookups ``[B, Σ lookup dims]`` (lookup order) -> ``[B, F, dim]``.

    ``op`` joins terms: ``"sum"`` or ``"mult"`` (QR). Built from the lookups' placements
    alone, so training and serving share it.
    """

    def __init__(
        self,
        lookups: Sequence[Lookup],
        lookup_dims: Sequence[int],
        num_fields: int,
        dim: int,
        op: str = "sum",
    ) -> None:
        super().__init__()
        if op not in ("sum", "mult"):
            raise ValueError(f"unknown combine op {op!r}")
        self.op = op
        self.num_fields = num_fields
        self.dim = dim
        terms = sorted({lk.term for lk in lookups})
        if terms != list(range(len(terms))):
            raise ValueError(f"lookup terms must be 0, 1, ... without gaps, got {terms}")
        src_start = [0]
        for d in lookup_dims:
            src_start.append(src_start[-1] + d)
        self.num_terms = len(terms)
        for t in terms:
            src, dst = [], []
            for i, lk in enumerate(lookups):
                if lk.term != t:
                    continue
                if lk.start + lookup_dims[i] > dim or not 0 <= lk.field < num_fields:
                    raise ValueError(f"lookup {lk.key!r} lands outside the [F, {dim}] output")
                src.append(torch.arange(src_start[i], src_start[i + 1]))
                dst.append(torch.arange(lookup_dims[i]) + lk.field * dim + lk.start)
            src_t, dst_t = torch.cat(src), torch.cat(dst)
            if t == 0 and len(set(dst_t.tolist())) != len(dst_t):
                raise ValueError("term 0 lookups must not overlap in a field's columns")
            self.register_buffer(f"_src{t}", src_t, persistent=False)
            self.register_buffer(f"_dst{t}", dst_t, persistent=False)
        # Term 0 as one gather: output column j reads pooled column gather[j]; uncovered
        # columns read an appended zero column (index src_start[-1]).
        self.padded = len(self._dst0) < num_fields * dim
        gather = torch.full((num_fields * dim,), src_start[-1], dtype=torch.int64)
        gather[self._dst0] = self._src0
        self.identity = bool(
            torch.equal(gather, torch.arange(num_fields * dim))
            and src_start[-1] == num_fields * dim
        )
        self.register_buffer("_gather", gather, persistent=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.identity:
            out = pooled
        else:
            source = pooled
            if self.padded:
                source = torch.cat([pooled, pooled.new_zeros(pooled.shape[0], 1)], dim=1)
            out = source.index_select(1, self._gather)
        for t in range(1, self.num_terms):
            src, dst = getattr(self, f"_src{t}"), getattr(self, f"_dst{t}")
            other = pooled.index_select(1, src)
            current = out.index_select(1, dst)
            joined = current * other if self.op == "mult" else current + other
            out = out.index_copy(1, dst, joined)
        return out.view(-1, self.num_fields, self.dim)
