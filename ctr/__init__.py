"""ctr-compress: CTR models over one unified, compressible embedding layer.

Example::

    from ctr import EmbeddingLayer, build_model, RunConfig, train_run, export, CompactModel
"""

import logging

# TorchRec's import triggers an fx deprecation notice on every start; it is not actionable.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

from ctr.artifact import CompactModel, export  # noqa: E402
from ctr.embedding import EmbeddingLayer, features_from_dataset  # noqa: E402
from ctr.models import MODELS, build_model  # noqa: E402
from ctr.run import RunConfig, load_run_model, train_run  # noqa: E402
from ctr.trainer import TrainConfig, Trainer  # noqa: E402

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
