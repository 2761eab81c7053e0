"""The trainer's side of a compressor's stages: :class:`RunContext` (the
:class:`~compressors.core.base.StageContext` a stage's hooks receive) and :class:`LossCheck`
(a diverging loss stops the run with a message naming the flags to lower).

Example::

    ctx = RunContext(trainer, stage, resumed=False)
    compressor.run_stage(stage, ctx)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from compressors.core.base import Stage

if TYPE_CHECKING:
    from ctr.training.config import TrainConfig
    from ctr.training.trainer import Trainer


class TrainingDiverged(RuntimeError):
    """The training loss stopped being a finite number."""


class LossCheck:
    """Watches a stage's training loss: a NaN or infinite loss stops the run at that step
    (every later step would train on garbage, and the final metrics would fail far from the
    cause; the last checkpoint stays as it was); a loss averaging over 4x what a constant 0.5
    prediction costs for ``window`` steps is diverging, and says so once."""

    WORSE_THAN_CONSTANT = 4.0

    def __init__(self, config: TrainConfig, window: int = 20) -> None:
        self.config, self.window = config, window
        self.total, self.count, self.warned = 0.0, 0, False

    def __call__(self, loss: float, step: int, stage: str) -> None:
        cfg = self.config
        flags = f"lower --lr ({cfg.lr:g}) or --table-lr ({cfg.table_lr:g})"
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss} at step {step} (stage {stage!r}): the run "
                f"diverged; {flags} and train into a new --out (or pass --overwrite)"
            )
        self.total, self.count = self.total + loss, self.count + 1
        if self.count < self.window:
            return
        mean, self.total, self.count = self.total / self.count, 0.0, 0
        if not self.warned and mean > self.WORSE_THAN_CONSTANT * math.log(2):
            self.warned = True
            print(
                f"warning: the training loss averaged {mean:.3g} over steps "
                f"{step - self.window + 1}-{step} (stage {stage!r}), over "
                f"{self.WORSE_THAN_CONSTANT:g}x what predicting 0.5 costs ({math.log(2):.3f}): "
                f"the run is diverging; {flags}",
                file=sys.stderr,
            )


class RunContext:
    """The trainer's :class:`~compressors.core.base.StageContext` for one stage."""

    def __init__(self, trainer: Trainer, stage: Stage, resumed: bool) -> None:
        self.trainer = trainer
        self.stage = stage
        self.resumed = resumed
        self.seed = trainer.config.seed
        self.embedding_l2 = trainer.config.embedding_l2
        self.batch: Any = None

    @property
    def table_lr(self) -> float:
        return self.trainer.embedding_lr

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.net

    @property
    def step(self) -> int:
        return self.trainer.state.step

    @property
    def stage_step(self) -> int:
        return self.trainer.state.stage_step

    @property
    def stage_steps(self) -> int:
        return self.trainer._stage_steps(self.stage)

    def loss(self, batch: Any) -> torch.Tensor:
        return self.trainer.loss(batch)

    def train_batches(self) -> Iterator:
        # On the model's device, as the trainer's own steps see them.
        to_device = self.trainer.placement.to_device
        epoch = 0
        while True:
            # Seeds apart from the training stages' epochs (which use epoch + 1000 * stage).
            for batch in self.trainer.train.epoch(10**6 + 1000 * self.trainer.state.stage + epoch):
                yield to_device(batch)
            epoch += 1

    def valid_batches(self) -> Iterator:
        return map(self.trainer.placement.to_device, self.trainer.valid_batches())

    def evaluate(self, split: str = "valid", max_batches: int | None = None) -> dict[str, float]:
        loaders = {"valid": self.trainer.valid, "train": self.trainer.train}
        if split not in loaders:
            raise ValueError(f"evaluate: split must be one of {sorted(loaders)}, got {split!r}")
        return self.trainer.evaluate(loaders[split], max_batches=max_batches)

    def progress(self, total: int, desc: str) -> Any:
        # A stage's own loop (a search's generations): a line each, even without bars.
        return self.trainer.progress(total, desc, quiet="each")

    def checkpoint(self, state: dict[str, Any]) -> None:
        self.trainer.stage_state = state
        self.trainer._checkpoint()

    def restored_state(self) -> dict[str, Any] | None:
        return self.trainer.stage_state if self.resumed else None

    def initial_state(self) -> dict[str, torch.Tensor]:
        return self.trainer.initial_state()

    def rng(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1009 + self.trainer.state.stage)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.placement.gather(t)
