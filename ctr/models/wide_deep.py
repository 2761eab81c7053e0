"""Wide & Deep (Cheng et al. 2016): a linear wide part plus an MLP over all inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctr.models.base import CTRModel, Embedding
from ctr.models.layers import FirstOrder, mlp


class WideDeep(CTRModel):
    name = "wide_deep"

    def __init__(
        self,
        embedding: Embedding,
        num_dense: int,
        hidden: Sequence[int] = (400, 400, 400),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(embedding, num_dense, hidden=list(hidden), dropout=dropout)
        self.wide = FirstOrder(self.num_fields, self.dim, num_dense)
        self.deep = mlp(self.num_fields * self.dim + num_dense, hidden, 1, dropout)

    def logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        deep_in = torch.cat([emb.flatten(1), dense], dim=1)
        return self.wide(emb, dense) + self.deep(deep_in).squeeze(1)
