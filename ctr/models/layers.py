"""Layers shared by the model zoo."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn


def mlp(
    in_features: int, hidden: Sequence[int], out_features: int | None = 1, dropout: float = 0.0
) -> nn.Sequential:
    """ReLU MLP ``in -> hidden... -> out`` (no activation on the output layer)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    if out_features is not None:
        layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class FirstOrder(nn.Module):
    """The linear (first-order) term: ``Σ_f <w_f, e_f> + <w, dense> + b``.

    A per-value scalar weight would need a second table outside the memory budget; a
    per-field projection of the field's embedding has the same capacity (``e_v`` is free)
    and keeps every embedding byte inside the compressed layer. (DeepFM's
    ``first_order="value"`` takes the textbook per-value weights from a column of the
    embedding instead and uses only :meth:`offset` here.)
    """

    def __init__(self, num_fields: int, dim: int, num_dense: int) -> None:
        super().__init__()
        self.field_weight = nn.Parameter(torch.zeros(num_fields, dim))
        self.dense = nn.Linear(num_dense, 1) if num_dense else None
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return (emb * self.field_weight).sum((1, 2)) + self.offset(dense)

    def offset(self, dense: torch.Tensor) -> torch.Tensor:
        """The dense features' linear term plus the bias: ``<w, dense> + b``."""
        if self.dense is None:
            return self.bias.expand(dense.shape[0])
        return self.dense(dense).squeeze(1) + self.bias


def fm_interaction(emb: torch.Tensor) -> torch.Tensor:
    """Factorisation-machine pairwise term ``Σ_{f<g} <e_f, e_g>`` for ``emb [B, F, D]``."""
    square_of_sum = emb.sum(1).pow(2)
    sum_of_square = emb.pow(2).sum(1)
    return 0.5 * (square_of_sum - sum_of_square).sum(1)


def pairwise_dots(vectors: torch.Tensor) -> torch.Tensor:
    """DLRM's dot interaction: upper-triangle ``<v_i, v_j>`` (i < j) of ``vectors [B, N, D]``."""
    n = vectors.shape[1]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))
    return gram.flatten(1).index_select(1, _upper_triangle(n, vectors.device))


@functools.cache
def _upper_triangle(n: int, device: torch.device) -> torch.Tensor:
    """Flat positions ``i * n + j`` (i < j) in an ``n x n`` matrix, built once per size."""
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return i * n + j
