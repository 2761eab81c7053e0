"""``robe`` — ROBE-Z: every embedding read from one small hashed array (Desai et al., MLSys 2022).

All compressed fields share one flat array of ``size`` floats (``(budget − table bytes) //
4``). The row of value ``v`` of field ``f`` is ``dim / Z`` chunks of ``Z`` contiguous floats,
chunk ``c`` starting at a salted hash of ``(f, c, v)`` modulo ``size`` (wrapping, the paper's
circular array) and multiplied by a ±1 sign hash. Small fields (``threshold``,
``table_share``) stay plain fp32 tables. How it works in detail, and the measured figures:
``docs/methods/robe.md``.

Options: ``chunk`` (``Z``, default ``min(4, dim)``), ``threshold``, ``table_share``, ``seed``,
``init_scale``, ``lr`` (the array's Adam learning rate) (``option_help`` says each).

Deviations from the paper:

* Hashes are the project's salted SplitMix64, not ``((a·x + b) mod p) mod size``.
* The array trains with its own Adam lr (``lr``, 3e-3).

Example::

    layer = build_compressor("robe", features, dim=16, budget="1000x")
    layer.hyperparameters()          # {'size': ..., 'chunk': 4, 'table_fields': [...]}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import FLOAT_BYTES, FeatureSpec
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.hybrid import (
    FieldModule,
    HybridMethod,
    HybridServing,
    collisionless_fields,
    hash_premixed,
    pool_bags,
    premixed_salts,
    register_field_module,
    take_rows,
)
from compressors.core.layout import field_index
from compressors.core.registry import register, register_serving
from compressors.core.storage import TableSpec

ROBE_KIND = "robe"
SIGN_TAG = "robe-sign/"
MAX_CHUNK = 62  # sign bits come from one non-negative 63-bit hash per chunk


@register_field_module
class RobeArray(FieldModule):
    """One hashed array shared by its fields; rows are ``dim / chunk`` signed chunks."""

    kind = ROBE_KIND
    hashes_values = True

    def __init__(
        self,
        fields: Sequence[str],
        dim: int,
        size: int,
        chunk: int,
        seed: int = 0,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__(fields, dim)
        if dim % chunk or not 1 <= chunk <= MAX_CHUNK:
            raise ValueError(f"robe: chunk must divide dim={dim} and lie in [1, {MAX_CHUNK}]")
        if size < chunk:
            raise ValueError(f"robe: the array needs at least one chunk ({chunk} floats)")
        self.size = size
        self.chunk = chunk
        self.seed = seed
        self.array = nn.Parameter(torch.empty(size).uniform_(-init_scale, init_scale))
        chunks = dim // chunk
        self.register_buffer(
            "_offset_salts", premixed_salts(fields, chunks, seed), persistent=False
        )
        self.register_buffer(
            "_sign_salts", premixed_salts(fields, chunks, seed, SIGN_TAG), persistent=False
        )
        self.register_buffer("_within", torch.arange(chunk), persistent=False)

    def locate(
        self, values: torch.Tensor, fields: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Array indices ``[N, dim]`` and signs ``[N, dim]`` of the rows of ``values``
        (``fields``: each value's position in :attr:`fields`)."""
        starts = hash_premixed(values, self._offset_salts[fields]) % self.size  # [N, chunks]
        index = starts.unsqueeze(-1) + self._within  # [N, chunks, Z]
        index = torch.where(index >= self.size, index - self.size, index)  # wrap, no division
        bits = hash_premixed(values, self._sign_salts[fields]).unsqueeze(-1) >> self._within
        signs = 1.0 - 2.0 * (bits & 1).to(self.array.dtype)
        return index.view(len(values), -1), signs.view(len(values), -1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        index, signs = self.locate(features.values(), field_index(features))
        return pool_bags(take_rows(self.array, index) * signs, features)

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "size": self.size, "chunk": self.chunk, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RobeArray:
        return cls(config["fields"], config["dim"], config["size"], config["chunk"], config["seed"])


@register
class Robe(HybridMethod):
    """ROBE-Z (see the module docstring). Options: ``chunk`` is Z (default ``min(4, dim)``);
    ``threshold``/``table_share`` choose the fields kept as tables; ``seed`` salts the hashes;
    ``init_scale`` bounds the uniform init of the array and the tables; ``lr`` is the array's
    Adam learning rate (None: the trainer's dense one)."""

    name = ROBE_KIND
    option_help = {
        "chunk": "Z, floats per contiguous chunk read (None: solved)",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        chunk: int | None = None,
        threshold: int = 200,
        table_share: float = 0.25,
        seed: int = 0,
        init_scale: float = 0.01,
        lr: float | None = 0.003,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        chunk = chunk or min(4, dim)
        table_fields = collisionless_fields(features, dim, budget_bytes, threshold, table_share)
        compressed = [f for i, f in enumerate(features) if i not in table_fields]
        module = None
        if compressed:
            tables = sum(
                TableSpec("t", features[i].cardinality, dim).serve_bytes for i in table_fields
            )
            size = min(
                (budget_bytes - tables) // FLOAT_BYTES, sum(f.cardinality for f in compressed) * dim
            )
            if size < dim:
                raise BudgetError(
                    f"robe: {describe_bytes(budget_bytes)} leaves {max(size, 0)} floats for the "
                    f"array after {describe_bytes(tables)} of tables; a row needs {dim}"
                )
            module = RobeArray([f.name for f in compressed], dim, size, chunk, seed, init_scale)
        self.assemble(table_fields, module, init_scale, lr)

    def hyperparameters(self) -> dict[str, Any]:
        size, chunk = (0, 0) if self.module is None else (self.module.size, self.module.chunk)
        return {**super().hyperparameters(), "size": size, "chunk": chunk}


register_serving(ROBE_KIND)(HybridServing)
