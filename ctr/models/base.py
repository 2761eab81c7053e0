"""What every CTR model shares: an embedding layer, dense inputs, one logit per sample."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torchrec import KeyedJaggedTensor


class Embedding(Protocol):
    """Anything that maps a KJT to ``[B, F, dim]``: the training layer or a serving module."""

    num_features: int
    dim: int

    def __call__(self, features: KeyedJaggedTensor) -> torch.Tensor: ...


class CTRModel(nn.Module):
    """Base of the zoo: ``forward(dense [B, n], sparse KJT) -> logits [B]``.

    Subclasses set ``name`` and keep their constructor keywords in ``self.options`` so an
    artifact can rebuild the same architecture.
    """

    name: ClassVar[str] = ""

    def __init__(self, embedding: Embedding, num_dense: int, **options: Any) -> None:
        super().__init__()
        self.embedding = embedding
        self.num_dense = num_dense
        self.options = options

    @property
    def num_fields(self) -> int:
        return self.embedding.num_features

    @property
    def dim(self) -> int:
        return self.embedding.dim

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.logits(dense, self.embedding(sparse))

    def logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
