"""Moved to :mod:`ctr.training.run`; this name stays for one release."""

from ctr.training.run import (  # noqa: F401
    PLAN_FILE,
    RUN_FILES,
    RunConfig,
    RunError,
    auto_batch_size,
    build_run_model,
    check_memory,
    check_run_plan,
    is_run_dir,
    load_run_model,
    train_run,
)
