"""``dhe`` — Deep Hash Embedding: no table, a hash encoding and an MLP (Kang et al., KDD 2021).

A value is encoded by ``hashes`` (``k``) universal hashes of its per-field salted 64-bit
hash into a dense vector in ``[-1, 1]`` (or Gaussian, ``transform``); a deep network of
``layers`` hidden layers (Linear → BatchNorm → Mish) turns it into the embedding. No table:
``serve_bytes`` is every exported parameter and statistic. The solver picks the widest
``width`` that fits at ``k = hashes``, halving ``k`` down to ``min_hashes`` before it refuses.
Small fields (``threshold``, ``table_share``) stay fp32 tables. How it works in detail, and
the measured figures: ``docs/methods/dhe.md``.

Options: ``hashes``, ``width``, ``layers``, ``min_width``, ``max_width``, ``min_hashes``,
``transform``, ``networks`` (``shared`` | ``per_field``), ``threshold``, ``table_share``,
``seed``, ``init_scale``, ``lr`` (``option_help`` says each).

Deviations from the paper:

- Hashes are multiply–add–shift over a salted SplitMix64 hash (``m = 2^20`` buckets), not
  ``((a·x + b) mod p) mod m``.
- One network shared by all fields by default (``networks="per_field"`` is the benchmark's
  reference setting); BatchNorm statistics are over a batch's distinct values.
- 2 hidden layers by default (``layers=5`` is the reference depth); the network trains with
  its own Adam lr (``lr``, 0.01).

Example::

    layer = build_compressor("dhe", features, dim=16, budget="100x")
    layer.hyperparameters()          # {'hashes': 1024, 'width': 38, 'layers': 2, ...}
    layer = build_compressor("dhe", features, dim=16, budget="10x", networks="per_field",
                             layers=5)  # the benchmark's reference setting
"""

from __future__ import annotations

import math
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

DHE_KIND = "dhe"
TRANSFORMS = ("uniform", "gaussian")
BUCKET_BITS = 20  # m = 2^20 buckets per hash function
ENCODE_CHUNK = 4096  # values encoded at once: bounds the [chunk, k] int64 temporaries
NETWORKS = ("shared", "per_field")
ACTIVATION_BATCH = 4096  # samples per batch assumed by train_bytes' activation term


def network_params(hashes: int, width: int, layers: int, dim: int) -> int:
    """Exported floats of the network: Linear weights/biases, BatchNorm affine + running stats."""
    linear = hashes * width + width + (layers - 1) * (width * width + width) + width * dim + dim
    return linear + layers * 4 * width


def solve_network(
    hashes: int,
    min_hashes: int,
    min_width: int,
    max_width: int,
    layers: int,
    dim: int,
    budget_floats: int,
) -> tuple[int, int] | None:
    """``(k, width)``: the most hash functions for which ``min_width`` fits, then the widest
    network up to ``max_width``; None when nothing fits."""
    k = hashes
    while k >= min_hashes:
        if network_params(k, min_width, layers, dim) <= budget_floats:
            width = min_width
            while width < max_width and network_params(k, width + 1, layers, dim) <= budget_floats:
                width += 1
            return k, width
        k //= 2
    return None


def embedding_network(hashes: int, width: int, layers: int, dim: int) -> nn.Sequential:
    """``k -> width -> ... -> dim``: ``layers`` × (Linear → BatchNorm → Mish), then Linear."""
    blocks: list[nn.Module] = []
    inputs = hashes
    for _ in range(layers):
        blocks += [nn.Linear(inputs, width), nn.BatchNorm1d(width), nn.Mish()]
        inputs = width
    blocks.append(nn.Linear(width, dim))
    return nn.Sequential(*blocks)


@register_field_module
class DeepHashEmbedding(FieldModule):
    """The dense hash encoding plus the embedding network(s): one shared by all its fields
    (``per_field=False``) or one per field (the reference setting)."""

    kind = DHE_KIND
    hashes_values = True

    def __init__(
        self,
        fields: Sequence[str],
        dim: int,
        hashes: int,
        width: int,
        layers: int,
        transform: str = "uniform",
        seed: int = 0,
        per_field: bool = False,
    ) -> None:
        super().__init__(fields, dim)
        if transform not in TRANSFORMS:
            raise ValueError(f"dhe: transform must be one of {TRANSFORMS}, got {transform!r}")
        if transform == "gaussian" and hashes % 2:
            raise ValueError("dhe: the gaussian transform pairs hashes; use an even count")
        if layers < 1 or width < 1 or hashes < 1:
            raise ValueError("dhe: hashes, width and layers must be positive")
        self.hashes = hashes
        self.width = width
        self.layers = layers
        self.transform = transform
        self.seed = seed
        self.per_field = per_field
        self.register_buffer("_field_salts", premixed_salts(fields, 1, seed), persistent=False)
        universal = premixed_salts(["dhe-a", "dhe-b"], hashes, seed)
        self.register_buffer("_mult", universal[0] | 1, persistent=False)  # odd multipliers
        self.register_buffer("_incr", universal[1], persistent=False)
        if per_field:
            self.networks = nn.ModuleList(
                embedding_network(hashes, width, layers, dim) for _ in self.fields
            )
        else:
            self.network = embedding_network(hashes, width, layers, dim)

    def keys(self, values: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """``[N]`` salted 63-bit hashes of ``values`` under their field's salt (``fields``:
        positions in the fields): all the encoding reads of a value, so any int64 key works
        (ids, or raw-value fingerprints)."""
        return hash_premixed(values, self._field_salts[fields]).squeeze(-1)

    def codes(self, values: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """Bucket codes ``[N, hashes]`` in ``[0, 2^20)``; ``fields``: positions in the fields."""
        return self._codes(self.keys(values, fields))

    def _codes(self, keyed: torch.Tensor) -> torch.Tensor:
        codes = keyed.unsqueeze(-1) * self._mult  # wraps mod 2^64, like the unsigned reference
        shift, mask = 64 - BUCKET_BITS, (1 << BUCKET_BITS) - 1
        return codes.add_(self._incr).bitwise_right_shift_(shift).bitwise_and_(mask)

    def encode(self, values: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """Dense hash encodings ``[N, hashes]``: in ``[-1, 1]`` (uniform) or N(0, 1) (gaussian)."""
        return self._encode(self.keys(values, fields))

    def _encode(self, keyed: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(keyed), self.hashes, device=keyed.device)
        for start in range(0, len(keyed), ENCODE_CHUNK):
            stop = start + ENCODE_CHUNK
            out[start:stop] = self._to_real(self._codes(keyed[start:stop]))
        return out

    def _to_real(self, codes: torch.Tensor) -> torch.Tensor:
        buckets = 1 << BUCKET_BITS
        if self.transform == "uniform":
            return codes.float().mul_(2.0 / (buckets - 1)).sub_(1.0)
        # Box–Muller: pairs of uniforms in (0, 1) -> pairs of independent standard normals.
        u = (codes.double() + 0.5) / buckets
        radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
        angle = 2.0 * math.pi * u[:, 1::2]
        return (
            torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2)
            .flatten(1)
            .float()
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        count = len(self.fields)
        if features.values().numel() == 0:  # only empty bags: nothing to embed
            return torch.zeros(features.stride(), count, self.dim, device=features.values().device)
        fields = field_index(features)
        # Distinct (field, value) pairs are distinct salted hashes (up to 2^-63 collisions),
        # whatever the values: ids or 64-bit raw-value fingerprints.
        unique, inverse = torch.unique(self.keys(features.values(), fields), return_inverse=True)
        if not self.per_field:
            embedded = self.network(self._encode(unique))
        else:
            owner = torch.empty_like(unique).scatter_(0, inverse, fields)
            embedded = torch.empty(len(unique), self.dim, device=unique.device)
            for j, network in enumerate(self.networks):
                mine = torch.nonzero(owner == j).squeeze(1)
                if len(mine):
                    embedded = embedded.index_copy(0, mine, network(self._encode(unique[mine])))
        return pool_bags(take_rows(embedded, inverse), features)

    def activation_bytes(self, batch: int = ACTIVATION_BATCH) -> int:
        """Per-batch working memory kept for backward (see the module docstring): encodings,
        saved hidden activations and the output of ``batch`` distinct values per field, plus
        one chunk's int64 codes."""
        distinct = batch * len(self.fields)
        floats = distinct * (self.hashes + 3 * self.width * self.layers + self.dim)
        codes = min(distinct, ENCODE_CHUNK) * self.hashes * 8
        return floats * FLOAT_BYTES + codes

    def train_bytes(self, optimizer: str = "adam") -> int:
        return super().train_bytes(optimizer) + self.activation_bytes()

    def to_config(self) -> dict[str, Any]:
        return {
            **super().to_config(),
            "hashes": self.hashes,
            "width": self.width,
            "layers": self.layers,
            "transform": self.transform,
            "seed": self.seed,
            "per_field": self.per_field,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DeepHashEmbedding:
        return cls(
            config["fields"],
            config["dim"],
            config["hashes"],
            config["width"],
            config["layers"],
            config["transform"],
            config["seed"],
            config.get("per_field", False),
        )


@register
class DHE(HybridMethod):
    """Deep Hash Embedding (see the module docstring). Options: ``networks`` ("shared" |
    "per_field", the reference's), ``hashes`` (k), ``width`` (None = solved), ``layers``,
    ``min_width``/``max_width``/``min_hashes`` bound the solver;
    ``transform`` ("uniform" | "gaussian"); ``threshold``/``table_share``
    choose the fields kept as tables; ``seed`` salts the hashes; ``lr`` is the network's Adam
    learning rate (None: the trainer's dense one); ``init_scale`` bounds the tables' init."""

    name = DHE_KIND
    option_help = {
        "hashes": "k, hash functions of the dense encoding",
        "width": "hidden width of the MLP (None: solved from the budget)",
        "layers": "hidden layers of the MLP",
        "networks": "shared (one network, default) or per_field (the reference's)",
        "min_width": "smallest acceptable solved width",
        "max_width": "largest solved width",
        "min_hashes": "fewest hashes when k must shrink to fit",
        "transform": "how hash codes become reals: uniform or gaussian",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        hashes: int = 1024,
        width: int | None = None,
        layers: int = 2,
        min_width: int | None = None,
        max_width: int = 512,
        min_hashes: int = 128,
        transform: str = "uniform",
        networks: str = "shared",
        threshold: int = 200,
        table_share: float = 0.25,
        seed: int = 0,
        init_scale: float = 0.01,
        lr: float | None = 0.01,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        if networks not in NETWORKS:
            raise ValueError(f"dhe: networks must be one of {NETWORKS}, got {networks!r}")
        table_fields = collisionless_fields(features, dim, budget_bytes, threshold, table_share)
        compressed = [f for i, f in enumerate(features) if i not in table_fields]
        module = None
        if compressed:
            tables = sum(
                TableSpec("t", features[i].cardinality, dim).serve_bytes for i in table_fields
            )
            copies = len(compressed) if networks == "per_field" else 1
            left = (budget_bytes - tables) // FLOAT_BYTES // copies
            lo, hi = (width, width) if width else (min_width or dim, max_width)
            fewest = min(hashes, min_hashes) if not width else hashes
            solved = solve_network(hashes, fewest, lo, hi, layers, dim, left)
            if solved is None:
                needed = network_params(fewest, lo, layers, dim) * FLOAT_BYTES * copies
                each = f"{copies} networks (one per field) of " if copies > 1 else ""
                raise BudgetError(
                    f"dhe: {describe_bytes(budget_bytes)} leaves "
                    f"{describe_bytes(max(left * copies, 0) * 4)} after {describe_bytes(tables)}"
                    f" of tables, but the smallest network ({each}{fewest} hashes, {layers} "
                    f"layers of width {lo}) needs {describe_bytes(needed)}"
                    + (
                        f"; fewer than min_hashes={min_hashes} hashes would be far from the "
                        "paper's 1024 (pass a smaller min_hashes to allow it)"
                        if not width and fewest > 1
                        else ""
                    )
                )
            k, w = solved
            module = DeepHashEmbedding(
                [f.name for f in compressed],
                dim,
                k,
                w,
                layers,
                transform,
                seed,
                per_field=networks == "per_field",
            )
        self.assemble(table_fields, module, init_scale, lr)

    def hyperparameters(self) -> dict[str, Any]:
        if self.module is None:
            return super().hyperparameters()
        m = self.module
        return {
            **super().hyperparameters(),
            "hashes": m.hashes,
            "width": m.width,
            "layers": m.layers,
            "transform": m.transform,
            "networks": "per_field" if m.per_field else "shared",
        }


register_serving(DHE_KIND)(HybridServing)
