"""Moved to :mod:`ctr.training.trainer`; this name stays for one release."""

from ctr.training.trainer import (  # noqa: F401
    ARCHITECTURE_KEY,
    DEFAULT_TABLE_LRS,
    OPTIMIZERS,
    LossCheck,
    RunContext,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainState,
    embedding_rows,
    load_weights,
    seed_everything,
    table_modules,
)
