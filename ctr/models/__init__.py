"""The model zoo: one short model per file, all consuming an ``EmbeddingLayer``.

Example::

    model = build_model("deepfm", layer, num_dense=13, hidden=[256, 128])
    logits = model(batch.dense_features, batch.sparse_features)
"""

from __future__ import annotations

from typing import Any

from ctr.models.base import CTRModel, Embedding
from ctr.models.dcnv2 import DCNv2
from ctr.models.deepfm import DeepFM
from ctr.models.dlrm import DLRM
from ctr.models.fm import FM
from ctr.models.lr import LR
from ctr.models.wide_deep import WideDeep

MODELS: dict[str, type[CTRModel]] = {m.name: m for m in (LR, FM, WideDeep, DeepFM, DCNv2, DLRM)}


def build_model(name: str, embedding: Embedding, num_dense: int, **options: Any) -> CTRModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](embedding, num_dense, **options)
    except (TypeError, ValueError) as e:
        raise type(e)(f"model {name!r} with options {options} (--model-opt): {e}") from e


__all__ = ["MODELS", "CTRModel", "DCNv2", "DLRM", "DeepFM", "FM", "LR", "WideDeep", "build_model"]
