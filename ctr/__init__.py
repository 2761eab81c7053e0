"""ctr-compress: CTR models over one unified, compressible embedding layer.

Names are imported on first use (PEP 562), so ``ctr --help`` and commands that need no
model do not pay for importing torch, TorchRec and fbgemm.

Example::

    from ctr import EmbeddingLayer, build_model, RunConfig, train_run, export, CompactModel
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# TorchRec's import triggers an fx deprecation notice on every start; it is not actionable.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

_HOMES = {
    "CompactModel": "ctr.artifact",
    "export": "ctr.artifact",
    "EmbeddingLayer": "ctr.embedding",
    "features_from_dataset": "ctr.embedding",
    "MODELS": "ctr.models",
    "build_model": "ctr.models",
    "RunConfig": "ctr.run",
    "load_run_model": "ctr.run",
    "train_run": "ctr.run",
    "TrainConfig": "ctr.trainer",
    "Trainer": "ctr.trainer",
}

if TYPE_CHECKING:
    from ctr.artifact import CompactModel, export
    from ctr.embedding import EmbeddingLayer, features_from_dataset
    from ctr.models import MODELS, build_model
    from ctr.run import RunConfig, load_run_model, train_run
    from ctr.trainer import TrainConfig, Trainer


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'ctr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "MODELS",
    "CompactModel",
    "EmbeddingLayer",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "build_model",
    "export",
    "features_from_dataset",
    "load_run_model",
    "train_run",
]
