"""LR — logistic regression on the (compressed) field embeddings and the dense features."""

from __future__ import annotations

import torch

from ctr.models.base import CTRModel, Embedding
from ctr.models.layers import FirstOrder


class LR(CTRModel):
    name = "lr"

    def __init__(self, embedding: Embedding, num_dense: int) -> None:
        super().__init__(embedding, num_dense)
        self.linear = FirstOrder(self.num_fields, self.dim, num_dense)

    def logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb, dense)
