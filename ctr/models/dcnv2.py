"""DCN-v2 (Wang et al. 2021): full-rank cross network (TorchRec's ``CrossNet``) stacked with
an MLP, over the concatenated embeddings and dense features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchrec.modules.crossnet import CrossNet

from ctr.models.base import CTRModel, Embedding
from ctr.models.layers import mlp


class DCNv2(CTRModel):
    name = "dcnv2"

    def __init__(
        self,
        embedding: Embedding,
        num_dense: int,
        cross_layers: int = 3,
        hidden: Sequence[int] = (400, 400, 400),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            embedding, num_dense, cross_layers=cross_layers, hidden=list(hidden), dropout=dropout
        )
        width = self.num_fields * self.dim + num_dense
        self.cross = CrossNet(in_features=width, num_layers=cross_layers)
        self.deep = mlp(width, hidden, 1, dropout)

    def logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([emb.flatten(1), dense], dim=1)
        return self.deep(self.cross(x0)).squeeze(1)
