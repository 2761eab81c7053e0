"""Frequency blocks and the index map that routes each id to its block's lookup.

Ids are frequency-ordered by preprocessing (id 1 the most frequent, id 0 the OOV bucket), so
a field's frequency blocks are id ranges. :func:`frequency_blocks` cuts a field into ``S``
ranges of equal train-frequency mass (DNIS's feature blocks, MDE's popularity blocks); a field
with fewer distinct masses than ``S`` gets fewer blocks.

:class:`BlockMap` turns a KJT keyed by field into a KJT with one key per (field, block): every
id goes to its block's key, the other keys of the field get empty bags. With per-block
sub-tables (``relative=True``) the row is ``id - block start``; with one table per field read
by every block's key (``relative=False``) the row stays the id. Because bags are summed,
``Σ_b pooled_b`` is the field's pooled vector, also for multi-hot fields, and any per-block
linear transform (DNIS's α, MDE's projection) applies exactly to the block's pooled vector.

Example::

    bounds = frequency_blocks(feature, 6)        # [0, 2, 5, 19, 80, 410, 1000]
    router = BlockMap(["C1"], [bounds], relative=True)
    router.lookup_keys                           # ['C1@0', ..., 'C1@5']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from compressors.core.base import FeatureSpec
from compressors.core.layout import IndexMap, field_index, register_index_map

# Field f's ids occupy [f * _FIELD_SPAN, (f + 1) * _FIELD_SPAN) of one sorted key space, so one
# searchsorted finds the block of every value of every field.
_FIELD_SPAN = 1 << 40


def frequency_blocks(feature: FeatureSpec, num_blocks: int, oov_block: bool = False) -> list[int]:
    """Block boundaries ``[0, b_1, ..., n]`` of ``feature``: ``num_blocks`` id ranges of equal
    train-frequency mass (fewer when the field is too small). Without frequencies every id
    weighs the same (equal-size blocks).

    ``oov_block``: the OOV id 0 is a block of its own (``[0, 1, b_2, ..., n]``) and the
    ``num_blocks`` blocks cut ids ``1..n-1``. Id 0 is not a value of the field's frequency
    order: unseen in train (a count of 0) it would sit in the head block as an untrained row,
    and where preprocessing folds rare values into it, its count says nothing of any value."""
    if num_blocks < 1:
        raise ValueError(f"the number of frequency blocks must be >= 1, got {num_blocks}")
    n = feature.cardinality
    counts = (
        np.ones(n) if feature.frequencies is None else np.asarray(feature.frequencies, np.float64)
    )
    if oov_block and n > 1:
        rest = FeatureSpec(feature.name, n - 1, frequencies=counts[1:])
        return [0] + [1 + b for b in frequency_blocks(rest, num_blocks)]
    cumulative = np.cumsum(counts)
    total = cumulative[-1]
    if total <= 0:
        cumulative, total = np.arange(1, n + 1, dtype=np.float64), float(n)
    targets = total * np.arange(1, num_blocks) / num_blocks
    # Block k ends after the first id whose cumulative mass reaches k/S of the total.
    cuts = np.searchsorted(cumulative, targets, side="left") + 1
    bounds = sorted({0, n, *(int(c) for c in cuts if 0 < c < n)})
    return bounds


def global_frequency_blocks(
    features: Sequence[FeatureSpec], num_blocks: int, oov_block: bool = False
) -> tuple[list[list[int]], list[list[int]]]:
    """Blocks over the values of every field ranked together by train frequency (DNIS's
    official code ranks one global id space), cut into ``num_blocks`` of equal train mass.

    Returns per field the boundaries of its id ranges and the global block of each range.
    Because a field's ids are frequency-ordered, a global block meets each field in one id
    range (empty ranges are left out, so a field lists only the blocks it has values in).
    Ties in frequency (and fields without frequencies, whose ids then weigh the same) go by
    the id's relative position in its field. ``oov_block``: every field's OOV id 0 forms
    global block 0, and the value blocks are ``1..num_blocks``."""
    if num_blocks < 1:
        raise ValueError(f"the number of frequency blocks must be >= 1, got {num_blocks}")
    first = 1 if oov_block else 0
    counts, relative, owner = [], [], []
    for f, feature in enumerate(features):
        n = feature.cardinality
        c = np.ones(n) if feature.frequencies is None else np.asarray(feature.frequencies, float)
        values = np.arange(first, n)
        counts.append(c[first:])
        relative.append((values - first) / max(n - first, 1))
        owner.append(np.full(len(values), f))
    count, rel, field = (np.concatenate(x) for x in (counts, relative, owner))
    order = np.lexsort((rel, -count))
    cumulative = np.cumsum(count[order])
    total = cumulative[-1] if len(cumulative) else 0.0
    if total <= 0:
        cumulative, total = np.arange(1, len(order) + 1, dtype=np.float64), float(len(order))
    targets = total * np.arange(1, num_blocks) / num_blocks
    # As frequency_blocks: block k ends after the first value whose cumulative mass reaches
    # k/S of the total.
    cuts = np.searchsorted(cumulative, targets, side="left") + 1
    block = np.empty(len(order), dtype=np.int64)
    block[order] = np.searchsorted(cuts, np.arange(len(order)), side="right")
    all_bounds, all_blocks = [], []
    start = 0
    for feature in features:
        n = feature.cardinality
        own = block[start : start + n - first] if n > first else np.zeros(0, np.int64)
        start += max(n - first, 0)
        # An id rarer than a later one (id 0 when it is not a block of its own, or a field
        # whose ids are not frequency-ordered) joins the block of the ids after it, so each
        # block stays one id range.
        own = np.minimum.accumulate(own[::-1])[::-1] if len(own) else own
        bounds, blocks = ([0, 1], [0]) if oov_block else ([0], [])
        for i in range(len(own)):
            if i == 0 or own[i] != own[i - 1]:
                if i > 0:
                    bounds.append(first + i)
                blocks.append(int(own[i]) + first)
        if len(own):
            bounds.append(n)
        all_bounds.append(bounds)
        all_blocks.append(blocks)
    return all_bounds, all_blocks


def block_ranges(bounds: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def block_key(feature: str, block: int) -> str:
    return f"{feature}@{block}"


@register_index_map
class BlockMap(IndexMap):
    """Field ids -> one lookup key per (field, frequency block); see the module docstring."""

    kind = "frequency_blocks"

    def __init__(
        self, features: Sequence[str], bounds: Sequence[Sequence[int]], relative: bool
    ) -> None:
        keys, starts, stops, fields = [], [], [], []
        for f, (name, b) in enumerate(zip(features, bounds, strict=True)):
            for k, (start, stop) in enumerate(block_ranges(b)):
                keys.append(block_key(name, k))
                starts.append(f * _FIELD_SPAN + start)
                stops.append(f * _FIELD_SPAN + stop)
                fields.append(f)
        super().__init__(features, keys)
        self.bounds = [[int(x) for x in b] for b in bounds]
        self.relative = relative
        self.lookup_fields = fields
        self.register_buffer("_starts", torch.tensor(starts, dtype=torch.int64), persistent=False)
        self.register_buffer("_stops", torch.tensor(stops, dtype=torch.int64), persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        features = self.check_keys(features)
        values, lengths = features.values().long(), features.lengths().long()
        batch = features.stride()
        place = field_index(features) * _FIELD_SPAN + values
        lookup = torch.searchsorted(self._stops, place, right=True)
        if len(place) and int(lookup.max()) >= len(self._stops):
            raise IndexError("an id lies beyond its field's cardinality")
        rows = place - self._starts[lookup] if self.relative else values
        # The sample of every value, then values ordered by (lookup, sample).
        sample = torch.repeat_interleave(
            torch.arange(len(lengths), device=values.device) % max(batch, 1),
            lengths,
            output_size=len(values),
        )
        slot = lookup * batch + sample
        order = torch.argsort(slot, stable=True)
        # Counted by index_add: bincount sizes its output by the largest slot, a
        # device-to-host sync each step on a GPU (slots lie below L·B, checked above).
        counts = slot.new_zeros(len(self.lookup_keys) * batch).index_add_(
            0, slot, torch.ones_like(slot)
        )
        return KeyedJaggedTensor(
            keys=self.lookup_keys, values=rows[order], lengths=counts, stride=batch
        )

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "bounds": self.bounds, "relative": self.relative}

    def tensors(self) -> dict[str, torch.Tensor]:
        # Serving needs every block's id range: one int64 per boundary.
        return {"bounds": torch.tensor([x for b in self.bounds for x in b], dtype=torch.int64)}

    @classmethod
    def from_config(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BlockMap:
        flat = tensors["bounds"].tolist()
        bounds, i = [], 0
        for b in config["bounds"]:
            bounds.append(flat[i : i + len(b)])
            i += len(b)
        if bounds != config["bounds"]:
            raise ValueError("frequency_blocks index map: the bounds tensor disagrees with config")
        return cls(config["features"], bounds, config["relative"])


def router_bytes(bounds: Sequence[Sequence[int]]) -> int:
    """Bytes of :meth:`BlockMap.tensors` for ``bounds`` (arithmetic)."""
    return 8 * sum(len(b) for b in bounds)
