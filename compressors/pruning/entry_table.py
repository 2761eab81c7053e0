"""The training storage of the pruning family: :class:`EntryTable`, one fp32 table whose rows a
method masks or reparameterises in the forward pass.

OptEmbed's row mask sends a straight-through gradient into the embedding values through their
L1 norm, PEP reparameterises every entry (``sign(w)·relu(|w| − g(s))``) and DeepLight
multiplies entries by a mask; none of these can run inside fbgemm's fused TBE backward, which
only ever sees pooled gradients. So :class:`EntryTable` keeps all fields in one fp32 table (a
buffer, field ``f`` owning rows ``[offset_f, offset_f + n_f)``), reads a batch's unique rows
into a small leaf tensor, lets the method transform them, pools them with ``embedding_bag``
and, after the optimizer step, updates exactly those rows with the same optimiser family the
fused tables use (row-wise Adagrad by default;
:class:`~compressors.precision.integer.SparseRowOptimizer`). It is one of the trainer's
:class:`~compressors.core.decay.EmbeddingRows`: stepped at the run's current embedding lr and
decayed by its embedding L2 like the fused tables. ``train_bytes`` counts the whole fp32
table, its optimizer state and the masks: these methods need the full table while training,
and say so. The tables are buffers, not TorchRec tables, so training is replicated
under ``torchrun``: :meth:`step` averages the ranks' row gradients first
(:func:`~compressors.core.collective.average_rows`), so every rank applies the global batch's
update to identical rows.

The byte arithmetic lives in :mod:`compressors.pruning.bytes`, the index maps in
:mod:`compressors.pruning.remap`, the ``pruned`` export and its serving module in
:mod:`compressors.pruning.serving`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import FeatureSpec
from compressors.core.collective import average_rows
from compressors.core.decay import EmbeddingRows
from compressors.precision.integer import SparseRowOptimizer

_CHUNK_ROWS = 1 << 18


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
        device = self.weight.device
        counts = torch.tensor(features.length_per_key(), device=device)
        fields = torch.repeat_interleave(
            torch.arange(len(self.names), device=device),
            counts,
            output_size=features.values().numel(),
        )
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
        rows, grad = average_rows(pending[0], pending[1].grad)
        if len(rows) != len(pending[0]):  # other ranks read rows this one did not
            if self.decay is not None:
                self.decay.touch({"weight": rows})
            values = self.weight[rows]
        else:
            values = pending[1].detach()
        self.weight[rows] = self.optimizer.step(rows, values, grad, lr)
        return rows

    def step_rows(self, lr: float) -> None:
        self.step(lr)

    def use_optimizer(self, kind: str) -> None:
        if self.follows_run and kind != self.optimizer.kind:
            # Set after the model moved to its device: the state lives beside the weights.
            self.optimizer = SparseRowOptimizer(
                kind, self.rows, self.dim, device=self.weight.device
            )

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
