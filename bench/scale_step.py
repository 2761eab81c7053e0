"""The ``scale_step`` bench section: each method's training step against ``full``'s, side by side
in one process at one vocabulary.

The ``scale`` section runs every method in its own process, so its step times of two methods
never share a machine state; on a shared machine their ratio carries the load's swings. Here
``full`` and every method of ``--methods`` (default: the pruning family, optembed, pep and
deeplight) are built in one process on one thread, on the scale section's cached dataset of
the first ``--scale-ids`` vocabulary (generated on first use), and step in turn on the same
batches: ``Trainer.train_step`` (and a bilevel stage's architecture step) plus the method's
``after_step`` hook in its first stage, ``--scale-step-count`` rounds. Reported per method:
the median and the mean process-CPU time of a step after ``--scale-warmup`` rounds, and their
ratios to ``full``'s (the mean includes periodic hooks, e.g. a sparsity check every 10 steps).

Run: ``python bench.py --only scale_step --scale-ids 1e6`` (``--methods pep``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.output import CACHE, print_table
from bench.scale import parse_ids, scale_dataset

PRUNING = ("optembed", "pep", "deeplight")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("scale_step").add_argument(
        "--scale-step-count", type=int, default=20, help="scale_step: rounds of steps"
    )


def bench_scale_step(args: argparse.Namespace) -> dict[str, Any]:
    """Step time of each method against full's, interleaved in one process (module docstring)."""
    import torch

    from ctr import RunConfig, TrainConfig, Trainer
    from ctr.training.context import RunContext
    from ctr.training.run import build_run_model
    from datasets.loader import BatchLoader
    from datasets.prepared import DatasetMeta

    torch.set_num_threads(1)
    target = parse_ids(args.scale_ids)[0]
    info = scale_dataset(target, args.scale_rows_per_id, CACHE / "scale" / "data")
    methods = [m for m in (args.methods or "").split(",") if m and m != "full"] or list(PRUNING)
    meta = DatasetMeta.load(info["path"])
    bs, rounds, warm = args.scale_batch_size, args.scale_step_count, args.scale_warmup
    train = BatchLoader(meta, "train", bs, shuffle=True, drop_last=True, cache_rows=0)
    batches = [b for _, b in zip(range(rounds), train.epoch(1), strict=False)]
    valid = BatchLoader(meta, "valid", bs, cache_rows=0)
    runs = {}
    for method in ["full", *methods]:
        cfg = RunConfig(
            data=info["path"],
            model=args.scale_model,
            compressor=method,
            budget="1x" if method == "full" else args.scale_budget,
            train=TrainConfig(epochs=1.0, batch_size=bs, progress=False),
        ).resolved()
        trainer = Trainer(build_run_model(cfg, meta), train, valid, cfg.train)
        stage = trainer.compressor.stages[0]
        ctx = RunContext(trainer, stage, False)
        trainer.compressor.on_stage_start(stage, ctx)
        runs[method] = (trainer, stage, ctx, cfg.train.table_optimizer, [])
    for batch in batches:
        for trainer, stage, ctx, _, times in runs.values():
            start = time.process_time()
            trainer.train_step(batch, dense=stage.dense)
            if stage.bilevel:
                trainer.valid_step(batch)
            ctx.batch = batch
            trainer.compressor.after_step(ctx)
            trainer.state.stage_step += 1
            trainer.state.step += 1
            times.append(time.process_time() - start)
    timed = {m: run[4][warm:] if len(run[4]) > warm else run[4] for m, run in runs.items()}
    base_median = statistics.median(timed["full"])
    base_mean = statistics.mean(timed["full"])
    rows = []
    for method, (_, stage, _, optimizer, _) in runs.items():
        median, mean = statistics.median(timed[method]), statistics.mean(timed[method])
        rows.append(
            {
                "method": method,
                "stage": stage.name,
                "table optimizer": optimizer,
                "median cpu ms": round(median * 1e3, 1),
                "median / full": round(median / base_median, 2),
                "mean cpu ms": round(mean * 1e3, 1),
                "mean / full": round(mean / base_mean, 2),
            }
        )
    print_table(
        f"scale_step: {info['ids']:,} ids, {len(batches)} rounds interleaved, one thread", rows
    )
    return {"data": info, "rows": rows}
