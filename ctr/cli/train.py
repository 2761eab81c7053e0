"""``ctr train``, ``ctr export`` and ``ctr predict``.

The train flags' defaults are :class:`~ctr.training.config.RunConfig`'s and
:class:`~ctr.training.config.TrainConfig`'s fields, the model and method choices the
registries (``MODELS``, the compressors' registry): building these parsers imports torch,
so ``ctr.cli.main`` builds them only for these commands.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from ctr.cli.common import (
    HelpFormatter,
    add_field,
    add_fields,
    config_values,
    parse_budget,
    parse_options,
)

HELP = {
    "train": "train a CTR model under an embedding budget",
    "export": "export a finished run to a serving artifact",
    "predict": "predict a prepared split with an artifact",
}
EPILOG_TRAIN = """examples:
  ctr train --data data/synth --model deepfm --compressor full --budget 1x --dim 16 \\
            --epochs 1 --out runs/deepfm
  ctr train --data data/synth --model dcnv2 --compressor unified --budget 100x --out runs/ue
  ctr train --data data/synth --compressor ptq --budget 6x --out runs/ptq   # mixed precision
  torchrun --nproc_per_node 2 -m ctr.cli train --data data/synth --out runs/dmp   # TorchRec DMP
An interrupted run resumes exactly when the same command is run again."""
EPILOG_EXPORT = """examples:
  ctr export runs/deepfm --out artifacts/deepfm
  ctr export runs/deepfm --out artifacts/deepfm-int8 --storage int8"""
EPILOG_PREDICT = """example:
  ctr predict artifacts/deepfm --data data/synth --split test --out preds.csv"""

# TrainConfig fields that are `ctr train` flags, in help order; each default is the field's.
TRAIN_FLAGS = {
    "epochs": "epochs (fractions allowed)",
    "lr": "Adam lr of dense parameters",
}
TRAIN_FLAGS_AFTER_TABLES = {
    "eval_every": "steps between evals (0: per epoch)",
    "patience": "evals without improvement to stop",
    "seed": "seed of initialisation and shuffling",
    "max_steps": "stop after N steps (resumable)",
    "device": "auto (CUDA when present, else cpu), cpu, cuda or cuda:N (single process)",
}


def add_parsers(sub: Any) -> None:
    from compressors.core.registry import available
    from ctr.models import MODELS
    from ctr.training.run import RunConfig
    from ctr.training.trainer import DEFAULT_TABLE_LRS, TrainConfig

    fmt = HelpFormatter
    p = sub.add_parser("train", help=HELP["train"], epilog=EPILOG_TRAIN, formatter_class=fmt)
    p.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
    add_field(p, RunConfig, "model", ", ".join(MODELS), choices=list(MODELS), metavar="MODEL")
    p.add_argument(
        "--model-opt",
        action="append",
        metavar="KEY=VALUE",
        help="model option, e.g. hidden=[256,128] (repeatable)",
    )
    add_field(
        p,
        RunConfig,
        "compressor",
        "method name (see `ctr methods`)",
        choices=available(),
        metavar="METHOD",
    )
    add_field(p, RunConfig, "budget", "'10x', a fraction like 0.1, '25MB' or bytes")
    p.add_argument(
        "--method-opt",
        action="append",
        metavar="KEY=VALUE",
        help="method option, e.g. shared=true or storage=int8 (repeatable)",
    )
    add_field(p, RunConfig, "dim", "embedding dim of the model")
    add_fields(p, TrainConfig, TRAIN_FLAGS)
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: >= 200 steps/epoch in 256..4096"
    )
    lrs = ", ".join(f"{lr:g} for {name}" for name, lr in DEFAULT_TABLE_LRS.items())
    add_field(
        p,
        TrainConfig,
        "table_lr",
        f"lr of the embedding tables' optimizer (default: the optimizer's, {lrs})",
        type=float,
    )
    add_field(
        p,
        TrainConfig,
        "table_optimizer",
        "optimizer of every embedding table: auto (default) is the method's "
        "(rowwise_adagrad, fbgemm's fused kernel; adam for optembed, pep, deeplight, dnis); "
        "adam is lazy sparse Adam outside fbgemm's CPU fused kernels, single process",
        choices=["auto", *DEFAULT_TABLE_LRS],
    )
    add_fields(p, TrainConfig, TRAIN_FLAGS_AFTER_TABLES, max_steps=int)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace a different run at --out")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (a line per stage instead)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help=HELP["export"], epilog=EPILOG_EXPORT, formatter_class=fmt)
    p.add_argument("run", type=Path, help="a finished run directory (ctr train --out)")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--storage", default="", help="serve tables at fp16/int8/int4/int2 instead")
    p.add_argument("--overwrite", action="store_true", help="replace an artifact at --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help=HELP["predict"], epilog=EPILOG_PREDICT, formatter_class=fmt)
    p.add_argument("artifact", type=Path, help="an artifact directory (ctr export --out)")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
    p.add_argument("--split", default="test", help="train, valid or test")
    p.add_argument("--batch-size", type=int, default=16384, help="rows per forward")
    p.add_argument("--out", type=Path, default=None, help="CSV of prob,label")
    p.add_argument("--overwrite", action="store_true", help="replace a predictions CSV at --out")
    p.set_defaults(func=cmd_predict)


def _run_config(args: argparse.Namespace) -> Any:
    from ctr.training.config import RunConfig, TrainConfig, resolve_table_optimizer
    from ctr.training.run import auto_batch_size
    from datasets.prepared import DatasetMeta

    batch_size = args.batch_size
    if batch_size is None:
        rows = DatasetMeta.load(args.data).rows("train")
        batch_size = auto_batch_size(rows)
        print(f"batch size {batch_size} ({rows // batch_size} steps per epoch; set --batch-size)")
    optimizer, table_lr = resolve_table_optimizer(
        args.compressor, args.table_optimizer, args.table_lr
    )
    if args.table_optimizer == "auto" or args.table_lr is None:
        print(f"table optimizer {optimizer} at lr {table_lr:g} (set --table-optimizer/--table-lr)")
    train = TrainConfig(
        **config_values(args, [*TRAIN_FLAGS, *TRAIN_FLAGS_AFTER_TABLES]),
        batch_size=batch_size,
        table_lr=table_lr,
        table_optimizer=optimizer,
        progress=not args.no_progress,
    )
    return RunConfig(
        data=str(args.data),
        model=args.model,
        model_options=parse_options(args.model_opt, "--model-opt"),
        dim=args.dim,
        compressor=args.compressor,
        budget=parse_budget(args.budget),
        method_options=parse_options(args.method_opt, "--method-opt"),
        train=train,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from ctr.training.resources import configure_threads

    # First: OpenMP reads its wait policy when torch loads it. The run warns of busy CPUs
    # once its settings are checked (an error comes first).
    configure_threads(warn=False)
    from compressors.core.budget import describe_bytes
    from ctr.training.distributed import init_from_env, shutdown
    from ctr.training.run import train_run

    info = init_from_env()
    try:
        summary = train_run(_run_config(args), args.out, info, overwrite=args.overwrite)
    finally:
        if info is not None:
            shutdown()
    if info is not None and not info.is_main:
        return 0
    if not summary["finished"]:
        print(f"stopped after {summary['steps']} steps (max_steps); run again to resume")
        return 0
    teacher = summary.get("teacher_test_auc")
    print(
        f"{summary['model']} + {summary['compressor']} @ {summary['budget']}: "
        f"test AUC {summary['test_auc']:.4f}, logloss {summary['test_logloss']:.4f}"
        + (f" (teacher AUC {teacher:.4f})" if teacher else "")
        + f"; serve {describe_bytes(summary['serve_bytes'])} ({summary['ratio']:.1f}x), "
        f"train {describe_bytes(summary['train_bytes'])}; "
        f"{summary['samples_per_sec']:,.0f} samples/s -> {args.out}/summary.json"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from compressors.core.budget import describe_bytes
    from ctr.serving.export import export
    from ctr.training.run import load_run_model

    model, cfg = load_run_model(args.run)
    if args.storage:
        # The trained layout (the run's plan), served at another dtype: never re-solved.
        model.embedding.compressor.set_storage(args.storage)
    manifest = export(
        model,
        args.out,
        dataset=cfg.data,
        extra={"run": {"dir": str(args.run), "config": cfg.to_json()}},
        overwrite=args.overwrite,
        vocabulary=cfg.vocabulary,
    )
    emb = manifest["embedding"]
    print(
        f"exported {args.run} -> {args.out}: embeddings {describe_bytes(emb['serve_bytes'])} "
        f"({emb['memory']['full_bytes'] / emb['serve_bytes']:.1f}x smaller than fp32)"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ctr.serving.compact import CompactModel
    from ctr.training.metrics import auc_logloss
    from datasets.loader import BatchLoader

    if args.out:
        _check_predictions_out(Path(args.out), args.overwrite)
    model = CompactModel.load(args.artifact)
    loader = BatchLoader(args.data, args.split, batch_size=args.batch_size)
    model.check_dataset(loader.meta)
    start = time.perf_counter()
    probs, labels = model.predict_loader(loader)
    elapsed = time.perf_counter() - start
    if args.out:
        _write_predictions(Path(args.out), probs, labels, args.overwrite)
    metrics = auc_logloss(labels, probs)
    print(
        f"{len(probs):,} predictions in {elapsed:.2f}s ({len(probs) / elapsed:,.0f}/s); "
        f"AUC {metrics['auc']:.4f}, logloss {metrics['logloss']:.4f}"
        + (f" -> {args.out}" if args.out else "")
    )
    return 0


PREDICTIONS_HEADER = "prob,label"


def _check_predictions_out(out: Path, overwrite: bool) -> None:
    """Refuses to replace a file that is not a predictions CSV, or one without --overwrite."""
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; expected a CSV file path")
    if not out.exists():
        return
    if not out.is_file():
        # A pipe, a terminal or a device: reading it to check it is ours would block.
        raise ValueError(
            f"--out {out}: is not a regular file (a pipe or device); expected a CSV file path"
        )
    with open(out, "rb") as f:
        ours = f.readline().rstrip(b"\r\n") == PREDICTIONS_HEADER.encode()
    if not ours:
        raise ValueError(f"--out {out}: exists and is not a predictions CSV; choose another path")
    if not overwrite:
        raise ValueError(f"--out {out}: exists; pass --overwrite to replace it")


def _write_predictions(out: Path, probs: Any, labels: Any, overwrite: bool) -> None:
    import numpy as np

    from datasets.io import atomic_write

    _check_predictions_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the CSV private
        np.savetxt(
            tmp,
            np.stack([probs, labels], 1),
            delimiter=",",
            header=PREDICTIONS_HEADER,
            comments="",
            fmt=["%.6f", "%g"],
        )

    atomic_write(out, write)
