"""The unified embedding layer — the only thing models see of the embedding tables.

Example::

    layer = EmbeddingLayer(features, dim=16, compressor="full", budget="1x")
    layer = EmbeddingLayer.from_dataset("data/synth", dim=16, compressor="full", shared=True)
    emb = layer(batch.sparse_features)     # [B, F, 16], whatever the backend
    layer.memory().serve_bytes
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors import Compressor, ExportedEmbedding, FeatureSpec, MemoryReport, build_compressor
from compressors.core.base import Stage
from compressors.core.budget import Budget
from compressors.core.keys import FingerprintKeys
from compressors.core.layout import IdRangeCheck
from compressors.core.registry import method_options
from datasets.encode import load_field_vocabs
from datasets.fingerprint import MISSING, fingerprint_strings
from datasets.prepared import DatasetMeta

KEYS = ("id", "fingerprint")


def features_from_dataset(
    data: str | Path | DatasetMeta, fingerprints: bool = False
) -> list[FeatureSpec]:
    """Feature specs (with train frequencies) of a prepared dataset; ``fingerprints`` adds each
    id's raw-value fingerprint (for ``keys="fingerprint"``; reads the vocabulary)."""
    meta = data if isinstance(data, DatasetMeta) else DatasetMeta.load(data)
    freqs = meta.frequencies()
    prints = vocabulary_fingerprints(meta) if fingerprints else {}
    return [
        FeatureSpec(f.name, f.cardinality, f.multi_hot, freqs[f.name], prints.get(f.name))
        for f in meta.sparse
    ]


def vocabulary_fingerprints(meta: DatasetMeta) -> dict[str, np.ndarray]:
    """Per field, the fingerprint of every id's raw value (id 0, the OOV bucket: missing)."""
    return {
        name: np.concatenate([[MISSING], fingerprint_strings(vocab.values)])
        for name, vocab in load_field_vocabs(meta).items()
    }


class EmbeddingLayer(nn.Module):
    """``KeyedJaggedTensor`` of field ids -> ``[B, F, dim]`` through a swappable compressor.

    ``compressor`` is a registered method name (see ``compressors.available()``) or a built
    :class:`Compressor`; ``budget`` is ``"10x"``, a fraction, ``"25MB"`` or bytes; further
    keywords are the method's options.

    ``keys="fingerprint"`` keys the fields a method hashes (``hash``, ``unified``, ``qr``,
    ``robe``, ``dhe``; ``compressor.hashed_fields()``) by raw-value fingerprints instead of
    ids, so they serve without a vocabulary (:mod:`compressors.core.keys`); features need
    ``fingerprints``. A method with a ``keys`` option of its own (``qr``) is given it.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        compressor: str | Compressor = "full",
        budget: Budget = "1x",
        keys: str = "id",
        **options: Any,
    ) -> None:
        super().__init__()
        if keys not in KEYS:
            raise ValueError(f"keys must be one of {KEYS}, got {keys!r}")
        if isinstance(compressor, Compressor):
            if options:
                raise TypeError("options are only accepted with a compressor name")
            self.compressor = compressor
        else:
            if keys != "id" and "keys" in method_options(compressor):
                # The method's rows depend on how values are keyed (qr hashes fingerprints
                # before splitting them): it takes the layer's keys as its own option.
                options = {"keys": keys, **options}
            self.compressor = build_compressor(compressor, features, dim, budget, **options)
        self.method = self.compressor.name
        self.budget = budget
        self.options = options
        self.check_ids = IdRangeCheck({f.name: f.cardinality for f in self.compressor.features})
        self.keys = keys
        #: fields keyed by raw-value fingerprint (empty: every field is keyed by id)
        self.fingerprint_fields = self.compressor.hashed_fields() if keys == "fingerprint" else []
        if keys == "fingerprint" and not self.fingerprint_fields:
            raise ValueError(
                f"{self.method}: keys='fingerprint' needs a method that hashes values "
                "(hash, unified, qr, robe, dhe); this one hashes no field"
            )
        self.key_map = FingerprintKeys(self.compressor.features, self.fingerprint_fields)

    @classmethod
    def from_dataset(
        cls,
        data: str | Path | DatasetMeta,
        dim: int,
        compressor: str = "full",
        budget: Budget = "1x",
        **options: Any,
    ) -> EmbeddingLayer:
        return cls(features_from_dataset(data), dim, compressor, budget, **options)

    @property
    def dim(self) -> int:
        return self.compressor.dim

    @property
    def num_features(self) -> int:
        return self.compressor.num_features

    @property
    def features(self) -> list[FeatureSpec]:
        return self.compressor.features

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.compressor.stages

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        self.check_ids(features)
        return self.compressor(self.key_map(features))

    def penalty(self) -> torch.Tensor:
        return self.compressor.penalty()

    def memory(self) -> MemoryReport:
        return self.compressor.memory()

    def export(self) -> ExportedEmbedding:
        return self.compressor.export()


class ServingEmbedding(nn.Module):
    """A serving module with the attributes models expect of an embedding layer."""

    def __init__(
        self,
        module: nn.Module,
        num_features: int,
        dim: int,
        method: str,
        cardinality: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.num_features = num_features
        self.dim = dim
        self.method = method
        self.check_ids = IdRangeCheck(cardinality) if cardinality is not None else None

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if self.check_ids is not None:
            self.check_ids(features)
        return self.module(features)
