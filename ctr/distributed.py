"""Moved to :mod:`ctr.training.distributed`; this name stays for one release."""

from ctr.training.distributed import (  # noqa: F401
    DistInfo,
    ShardedTableOptimizer,
    dense_parameters,
    full_state_dict,
    init_from_env,
    load_full_state_dict,
    shard_model,
    shutdown,
    unshard,
)
