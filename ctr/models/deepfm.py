"""DeepFM (Guo et al. 2017): FM and an MLP sharing the field embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctr.models.base import CTRModel, Embedding
from ctr.models.layers import FirstOrder, fm_interaction, mlp


class DeepFM(CTRModel):
    name = "deepfm"

    def __init__(
        self,
        embedding: Embedding,
        num_dense: int,
        hidden: Sequence[int] = (400, 400, 400),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(embedding, num_dense, hidden=list(hidden), dropout=dropout)
        self.linear = FirstOrder(self.num_fields, self.dim, num_dense)
        self.deep = mlp(self.num_fields * self.dim + num_dense, hidden, 1, dropout)

    def logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        deep = self.deep(torch.cat([emb.flatten(1), dense], dim=1)).squeeze(1)
        return self.linear(emb, dense) + fm_interaction(emb) + deep
