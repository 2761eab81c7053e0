"""Driver of the conformance suite's DMP check: under one ``torchrun`` process group, trains
every registered method a few steps with TorchRec DMP and writes what happened per method.

Usage (tests/contract/test_contract.py launches it)::

    torchrun --nproc_per_node 2 tests/helpers/contract_dmp.py DATA OUT_DIR [METHOD ...]
    # OUT_DIR/dmp.json: {"hash": {"status": "trained"}, "alpt": {"status": "error", ...}}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from compressors import BudgetError, available, solve
from ctr.embedding import features_from_dataset
from ctr.training.distributed import init_from_env, shutdown
from ctr.training.run import RunConfig, train_run
from ctr.training.trainer import TrainConfig


def main(data: str, out: str, only: list[str]) -> None:
    info = init_from_env()
    assert info is not None, "run me under torchrun"
    features = features_from_dataset(data)
    results = {}
    for name in only or available():
        print(f"rank {info.rank}: {name}", flush=True)
        budget = next(b for b in ("2x", "1x") if _fits(name, features, b))
        cfg = RunConfig(
            data=data,
            model="deepfm",
            model_options={"hidden": [8]},
            dim=8,
            compressor=name,
            budget=budget,
            train=TrainConfig(
                epochs=0.3, batch_size=512, progress=False, eval_every=100, max_steps=2
            ),
        )
        try:
            summary = train_run(cfg, Path(out) / name, info)
            results[name] = {"status": "trained", "steps": summary["steps"]}  # 2 steps
        except Exception as e:  # recorded, judged by the test
            results[name] = {"status": "error", "type": type(e).__name__, "message": str(e)}
        dist.barrier()
    if info.is_main:
        (Path(out) / "dmp.json").write_text(json.dumps(results, indent=1))
    shutdown()


def _fits(name, features, budget) -> bool:
    try:
        solve(name, features, 8, budget)
        return True
    except BudgetError:
        return False


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
