"""The compressor contract every method implements (see DESIGN.md, "The compressor contract").

A compressor is an ``nn.Module`` built from the feature specs, the model's ``dim`` and a budget
in bytes. It solves its own hyperparameters so that its serving footprint fits the budget,
maps a ``KeyedJaggedTensor`` of field ids to ``[B, F, dim]``, reports exact memory, lists its
training stages, and exports a serving representation that holds no pickled code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

if TYPE_CHECKING:
    from ctr.trainer import StageContext

FLOAT_BYTES = 4


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse field as the embedding layer sees it.

    ``cardinality`` counts every id including the OOV id 0. ``frequencies`` (train counts per
    id, optional) lets frequency-aware methods split head from tail.
    """

    name: str
    cardinality: int
    multi_hot: bool = False
    frequencies: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.cardinality < 1:
            raise ValueError(f"feature {self.name!r}: cardinality must be >= 1")
        if self.frequencies is not None and len(self.frequencies) != self.cardinality:
            raise ValueError(
                f"feature {self.name!r}: {len(self.frequencies)} frequencies for "
                f"cardinality {self.cardinality}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "cardinality": self.cardinality, "multi_hot": self.multi_hot}


def full_bytes(features: Sequence[FeatureSpec], dim: int) -> int:
    """Bytes of the uncompressed fp32 tables: ``sum(cardinality) * dim * 4``."""
    return sum(f.cardinality for f in features) * dim * FLOAT_BYTES


@dataclass
class MemoryReport:
    """Embedding memory of a built method.

    ``serve_bytes`` equals the bytes of the embedding tensors its artifact holds;
    ``train_bytes`` is the peak of embedding parameters plus optimizer state while training.
    ``parts`` breaks ``serve_bytes`` down by component.
    """

    serve_bytes: int
    train_bytes: int
    full_bytes: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Compression ratio: full fp32 bytes over serving bytes."""
        return self.full_bytes / max(self.serve_bytes, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "serve_bytes": self.serve_bytes,
            "train_bytes": self.train_bytes,
            "full_bytes": self.full_bytes,
            "ratio": self.ratio,
            "parts": dict(self.parts),
        }


@dataclass
class ExportedEmbedding:
    """A serving representation: a JSON-able ``config`` plus named tensors.

    ``kind`` names the serving module that :func:`compressors.build_serving` rebuilds from it;
    ``tensors`` are exactly the embedding bytes the artifact stores.
    """

    kind: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class Stage:
    """One step of a method's training procedure.

    ``trains``: the trainer runs epochs of gradient steps; otherwise the compressor's
    ``run_stage`` does the work (a search, a quantisation pass). ``epochs`` overrides the
    trainer's epoch count for this stage.
    """

    name: str
    trains: bool = True
    epochs: float | None = None


class Compressor(nn.Module):
    """Base class of every method. Subclasses set ``name`` and implement the abstract parts.

    Example::

        layer = build_compressor("full", features, dim=16, budget="1x")
        emb = layer(kjt)                # [B, F, 16]
        layer.memory().serve_bytes
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[Stage, ...]] = (Stage("train"),)

    def __init__(self, features: Sequence[FeatureSpec], dim: int, budget_bytes: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if not features:
            raise ValueError("at least one feature is needed")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names in {names}")
        self.features = list(features)
        self.dim = dim
        self.budget_bytes = budget_bytes
        self.full_bytes = full_bytes(features, dim)
        # The optimizer that trains physical tables; the trainer sets it (train_bytes uses it).
        self.table_optimizer = "rowwise_adagrad"

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def num_features(self) -> int:
        return len(self.features)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:  # [B, F, dim]
        raise NotImplementedError

    def penalty(self) -> torch.Tensor:
        """Extra loss terms (regularisers of thresholds, architecture weights, ...)."""
        return torch.zeros(())

    def memory(self) -> MemoryReport:
        raise NotImplementedError

    def export(self) -> ExportedEmbedding:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """What the budget solver chose, for run summaries and manifests."""
        return {}

    # Training hooks; the trainer calls them in this order. Defaults do nothing.
    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        """Called before a stage runs (e.g. freeze masks, switch modes)."""

    def run_stage(self, stage: Stage, ctx: StageContext) -> None:
        """Does the work of a stage with ``trains=False``."""
        raise NotImplementedError(f"{self.name}: stage {stage.name!r} has no implementation")

    def after_step(self, ctx: StageContext) -> None:
        """Called after every optimizer step of a training stage."""

    def on_stage_end(self, stage: Stage, ctx: StageContext) -> None:
        """Called after a stage finished (e.g. prune, fix a mask, quantise)."""

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups needing their own optimizer, as ``{"params", "optimizer", "lr"}``.

        Everything not listed here (and not a fused table) goes to the trainer's dense Adam.
        """
        return []

    def check_budget(self, serve_bytes: int, what: str = "") -> None:
        """Raises a clear error when the solved configuration exceeds the budget."""
        from compressors.budget import BudgetError, describe_bytes

        if serve_bytes > self.budget_bytes:
            raise BudgetError(
                f"{self.name}: {what or 'the configuration'} needs {describe_bytes(serve_bytes)} "
                f"but the budget is {describe_bytes(self.budget_bytes)} "
                f"({self.full_bytes / self.budget_bytes:.1f}x of {describe_bytes(self.full_bytes)})"
            )
