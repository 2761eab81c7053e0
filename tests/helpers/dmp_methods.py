"""Driver of the data-parallel methods' check: under one ``torchrun`` process group, trains
each named method with :func:`run_config` and leaves ``OUT_DIR/METHOD/summary.json``; the
test trains the same configs in one process and compares.

Usage (tests/ctr/training/test_dmp_methods.py launches it)::

    torchrun --nproc_per_node 2 tests/helpers/dmp_methods.py DATA OUT_DIR METHOD ...
"""

from __future__ import annotations

import sys
from pathlib import Path

from ctr.training.config import RunConfig, TrainConfig
from ctr.training.distributed import init_from_env, shutdown
from ctr.training.run import train_run

#: method -> (options, TrainConfig fields): each stage's machinery at least once (pep with
#: lazy embedding L2 on its replicated rows; autodim with its tables sharded; int8's
#: replicated code table).
METHODS = {
    "pep": ({}, {"embedding_l2": 1e-3}),
    "deeplight": ({}, {}),
    "optembed": ({"generations": 2, "mutations": 4, "crossovers": 4, "parents": 4}, {}),
    "dnis": ({}, {}),
    "autodim": ({}, {}),
    "mde": ({}, {}),
    "int8": ({}, {}),
}


def run_config(data: str, method: str) -> RunConfig:
    options, train = METHODS[method]
    return RunConfig(
        data=data,
        model="deepfm",
        model_options={"hidden": [8]},
        dim=8,
        compressor=method,
        budget="2x",
        method_options=options,
        train=TrainConfig(epochs=1, batch_size=512, eval_every=4, progress=False, seed=3, **train),
    )


def main(data: str, out: str, methods: list[str]) -> None:
    info = init_from_env()
    assert info is not None, "run me under torchrun"
    for method in methods:
        train_run(run_config(data, method), Path(out) / method, info)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
