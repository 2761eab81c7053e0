"""DLRM (Naumov et al. 2019): bottom MLP on dense features, dot interaction among all field
vectors, top MLP on the dense vector and the pairwise dots."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctr.models.base import CTRModel, Embedding
from ctr.models.layers import mlp, pairwise_dots


class DLRM(CTRModel):
    name = "dlrm"

    def __init__(
        self,
        embedding: Embedding,
        num_dense: int,
        bottom: Sequence[int] = (512, 256),
        top: Sequence[int] = (512, 256),
    ) -> None:
        super().__init__(embedding, num_dense, bottom=list(bottom), top=list(top))
        # The bottom MLP ends at the embedding dim so dense joins the dot interaction.
        self.bottom = mlp(num_dense, [*bottom, self.dim], None) if num_dense else None
        vectors = self.num_fields + (1 if num_dense else 0)
        pairs = vectors * (vectors - 1) // 2
        self.top = mlp(pairs + (self.dim if num_dense else 0), top, 1)

    def logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.bottom is None:
            return self.top(pairwise_dots(emb)).squeeze(1)
        dense_vec = self.bottom(dense)
        dots = pairwise_dots(torch.cat([dense_vec.unsqueeze(1), emb], dim=1))
        return self.top(torch.cat([dense_vec, dots], dim=1)).squeeze(1)
