"""DeepFM (Guo et al. 2017): FM and an MLP sharing the field embeddings.

First-order term (``first_order``):

* ``"field"`` (default): ``Σ_f <w_f, e_f>``, a learned per-field projection of the field's
  (compressed) embedding — the same capacity as a per-value weight when ``e_v`` is free, and
  every embedding byte stays inside the compressed layer.
* ``"value"``: the textbook per-value weights ``Σ_f w_{v_f}``. Their bytes must count in the
  embedding budget, and the layer holds one table per field of the model's ``dim``: so the
  last column of every embedding row *is* the value's first-order weight (a 1-dim table per
  field stored, compressed and counted by the compressor with the rest of the row), and the
  FM and the MLP use the other ``dim - 1`` columns. Pass ``dim = D + 1`` for D-dim factors
  where the method allows that dim. Not the default: at equal bytes it spends one column
  of every row on a scalar, and a separate 1-dim table would need a second compressed table
  in the layer, its export and its serving (the artifact holds one embedding).

Example::

    model = build_model("deepfm", layer, num_dense=13, hidden=[400, 400, 400])
    model = build_model("deepfm", layer, num_dense=13, first_order="value")  # textbook
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctr.models.base import CTRModel, Embedding
from ctr.models.layers import FirstOrder, fm_interaction, mlp

FIRST_ORDER = ("field", "value")


class DeepFM(CTRModel):
    name = "deepfm"

    def __init__(
        self,
        embedding: Embedding,
        num_dense: int,
        hidden: Sequence[int] = (400, 400, 400),
        dropout: float = 0.0,
        first_order: str = "field",
    ) -> None:
        if first_order not in FIRST_ORDER:
            raise ValueError(f"first_order must be one of {FIRST_ORDER}, got {first_order!r}")
        if first_order == "value" and embedding.dim < 2:
            raise ValueError("first_order='value' needs dim >= 2 (one column is the weight)")
        super().__init__(
            embedding, num_dense, hidden=list(hidden), dropout=dropout, first_order=first_order
        )
        self.per_value = first_order == "value"
        factors = self.dim - 1 if self.per_value else self.dim
        self.linear = FirstOrder(self.num_fields, 0 if self.per_value else self.dim, num_dense)
        self.deep = mlp(self.num_fields * factors + num_dense, hidden, 1, dropout)

    def logits(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.per_value:
            weights, emb = emb[..., -1], emb[..., :-1]
            linear = weights.sum(1) + self.linear.offset(dense)
        else:
            linear = self.linear(emb, dense)
        deep = self.deep(torch.cat([emb.flatten(1), dense], dim=1)).squeeze(1)
        return linear + fm_interaction(emb) + deep
