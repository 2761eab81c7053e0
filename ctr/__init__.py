"""ctr-compress: CTR models over one unified, compressible embedding layer.

Example::

    from ctr import EmbeddingLayer, build_model, RunConfig, train_run, export, CompactModel
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# TorchRec's import triggers an fx deprecation notice on every start; it is not actionable.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

# Public names, imported on first use (PEP 562): ``ctr --help`` and ``ctr methods`` do not
# pay for torch's import.
_EXPORTS = {
    "CompactModel": "ctr.serving.compact",
    "export": "ctr.serving.export",
    "EmbeddingLayer": "ctr.embedding",
    "features_from_dataset": "ctr.embedding",
    "MODELS": "ctr.models",
    "build_model": "ctr.models",
    "RunConfig": "ctr.training.config",
    "RunSummary": "ctr.training.summary",
    "load_run_model": "ctr.training.run",
    "train_run": "ctr.training.run",
    "TrainConfig": "ctr.training.config",
    "Trainer": "ctr.training.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ctr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
