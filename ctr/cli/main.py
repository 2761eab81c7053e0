"""The ``ctr`` command line: synth, prepare, train, export, predict, serve, demo, methods."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ctr.sweep_cli import add_sweep_parser

EPILOG_SYNTH = """example:
  ctr synth --rows 1000000 --out data/synth
  ctr synth --rows 200000 --scale 0.001 --multi-hot 2 --out data/small"""
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
EPILOG_SERVE = """examples:
  ctr serve artifacts/deepfm --port 8080
  ctr serve artifacts/versions/ --max-batch 4096 --max-delay-ms 2   # newest version, hot swap
  ctr serve artifacts/deepfm --workers 2                           # two processes, one port
  curl -s localhost:8080/v1/predict -H 'content-type: application/json' \\
       -d '{"instances": [{"C1": "68fd1e64", "I1": 3}]}'
Reload: POST /v1/reload or SIGHUP (a directory of versions is also polled)."""
EPILOG_DEMO = """example:
  ctr demo --out demo-output            # synthetic data -> DeepFM -> artifact -> predictions"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and each option's default after its help (unless the help
    already states it, or there is none to state)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, False, True, argparse.SUPPRESS)
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: %(default)s)"


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"{flag} expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = _value(value)
    return out


def _budget(text: str) -> str | float | int:
    value = _value(text)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def cmd_synth(args: argparse.Namespace) -> int:
    from datasets.synthetic import SyntheticConfig, generate_synthetic

    config = SyntheticConfig(
        rows=args.rows,
        scale=args.scale,
        multi_hot_fields=args.multi_hot,
        seed=args.seed,
        min_count=args.min_count,
    )
    meta = generate_synthetic(
        args.out, config, progress=not args.no_progress, overwrite=args.overwrite
    )
    teacher = meta.extra["teacher"]
    print(
        f"wrote {args.out}: {sum(s.rows for s in meta.splits.values()):,} rows, "
        f"{len(meta.sparse)} sparse fields ({sum(f.cardinality for f in meta.sparse):,} ids), "
        f"{len(meta.dense)} dense; teacher test AUC {teacher['test_auc']:.4f}"
    )
    return 0


def _run_config(args: argparse.Namespace) -> Any:
    from compressors.core.registry import COMPRESSORS
    from ctr.run import RunConfig, auto_batch_size
    from ctr.trainer import DEFAULT_TABLE_LRS, TrainConfig
    from datasets.format import DatasetMeta

    batch_size = args.batch_size
    if batch_size is None:
        rows = DatasetMeta.load(args.data).rows("train")
        batch_size = auto_batch_size(rows)
        print(f"batch size {batch_size} ({rows // batch_size} steps per epoch; set --batch-size)")
    optimizer, table_lr = args.table_optimizer, args.table_lr
    if optimizer == "auto":
        method = COMPRESSORS.get(args.compressor)
        optimizer = method.default_optimizer if method is not None else "rowwise_adagrad"
    if table_lr is None:
        table_lr = DEFAULT_TABLE_LRS[optimizer]
    if args.table_optimizer == "auto" or args.table_lr is None:
        print(f"table optimizer {optimizer} at lr {table_lr:g} (set --table-optimizer/--table-lr)")
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=batch_size,
        lr=args.lr,
        table_lr=table_lr,
        table_optimizer=optimizer,
        eval_every=args.eval_every,
        patience=args.patience,
        seed=args.seed,
        max_steps=args.max_steps,
        progress=not args.no_progress,
    )
    return RunConfig(
        data=str(args.data),
        model=args.model,
        model_options=_options(args.model_opt, "--model-opt"),
        dim=args.dim,
        compressor=args.compressor,
        budget=_budget(args.budget),
        method_options=_options(args.method_opt, "--method-opt"),
        train=train,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from ctr.resources import configure_threads

    # First: OpenMP reads its wait policy when torch loads it. The run warns of busy CPUs
    # once its settings are checked (an error comes first).
    configure_threads(warn=False)
    from compressors.core.budget import describe_bytes
    from ctr.distributed import init_from_env, shutdown
    from ctr.run import train_run

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
    from ctr.artifact import export
    from ctr.run import load_run_model

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

    from ctr.artifact import CompactModel
    from ctr.metrics import auc_logloss
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

    _check_predictions_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name beside the target: never a file of the user's that happens to match.
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the CSV private
    try:
        np.savetxt(
            tmp,
            np.stack([probs, labels], 1),
            delimiter=",",
            header=PREDICTIONS_HEADER,
            comments="",
            fmt=["%.6f", "%g"],
        )
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


DEMO_ENTRIES = {
    "data",
    "run-deepfm-full",
    "artifact-deepfm-fp32",
    "artifact-deepfm-int8",
    "predictions-fp32.csv",
    "predictions-int8.csv",
}


def _is_demo_output(path: Path) -> bool:
    from datasets.format import is_prepared_dataset
    from datasets.io import only_names

    return only_names(path, DEMO_ENTRIES) and is_prepared_dataset(path / "data")


def cmd_serve(args: argparse.Namespace) -> int:
    from ctr.serve import ServeConfig, serve

    config = ServeConfig(
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_rows=args.max_rows,
        max_queue_rows=args.max_queue_rows,
        poll_s=args.poll_s,
        binary_decode=args.binary_decode,
        workers=args.workers,
    )
    serve(args.artifact, args.host, args.port, config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from datasets.io import replace_dir

    started = time.perf_counter()
    # In place: the run and artifacts record absolute paths of what lies beside them.
    with replace_dir(args.out, "demo output", _is_demo_output, args.overwrite, in_place=True):
        _demo(Path(args.out), args.rows)
    print(f"demo finished in {time.perf_counter() - started:.0f}s; outputs under {args.out}/")
    return 0


def _demo(out: Path, rows: int) -> None:
    data = out / "data"
    cmd_synth(
        argparse.Namespace(
            rows=rows,
            scale=0.01,
            multi_hot=0,
            seed=0,
            min_count=10,
            out=data,
            no_progress=False,
            overwrite=False,
        )
    )
    run = out / "run-deepfm-full"
    train_args = build_parser().parse_args(
        [
            "train",
            "--data",
            str(data),
            "--model",
            "deepfm",
            "--compressor",
            "full",
            "--budget",
            "1x",
            "--dim",
            "16",
            "--epochs",
            "1",
            "--out",
            str(run),
        ]
    )
    cmd_train(train_args)
    for storage in ("", "int8"):
        name = storage or "fp32"
        target = out / f"artifact-deepfm-{name}"
        cmd_export(argparse.Namespace(run=run, out=target, storage=storage, overwrite=False))
        cmd_predict(
            argparse.Namespace(
                artifact=target,
                data=data,
                split="test",
                batch_size=16384,
                out=out / f"predictions-{name}.csv",
                overwrite=False,
            )
        )


def cmd_methods(args: argparse.Namespace) -> int:
    import importlib.util

    # compressors/catalog.py on its own: importing the package would import torch.
    package = importlib.util.find_spec("compressors")
    path = Path(package.submodule_search_locations[0]) / "catalog.py"  # type: ignore[index,union-attr]
    spec = importlib.util.spec_from_file_location("_ctr_catalog", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    for name, entry in module.catalog().items():
        print(f"{name:10s} {entry['summary']}")
        for spec in entry["options"]:
            default = f"{spec['name']}={spec['default']!r}"
            print(f"    {default:28s} {spec['type']:14s} {spec['help']}")
    return 0


def build_parser(prepare: bool = True) -> argparse.ArgumentParser:
    """The ``ctr`` parser. ``prepare=False`` lists ``prepare`` without importing its readers
    (pyarrow and the per-format modules), which only ``ctr prepare`` needs."""
    parser = argparse.ArgumentParser(
        prog="ctr",
        description="Train, compress and serve CTR embedding tables.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = HelpFormatter

    p = sub.add_parser(
        "synth",
        help="generate the synthetic Criteo-like dataset",
        epilog=EPILOG_SYNTH,
        formatter_class=fmt,
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="total rows (80/10/10 split)")
    p.add_argument("--scale", type=float, default=0.01, help="factor on Criteo's cardinalities")
    p.add_argument("--multi-hot", type=int, default=0, help="extra multi-hot fields")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and its teacher")
    p.add_argument(
        "--min-count",
        type=int,
        default=10,
        help="values seen fewer times in train map to the OOV id 0 (as Criteo preparation)",
    )
    p.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "train",
        help="train a CTR model under an embedding budget",
        epilog=EPILOG_TRAIN,
        formatter_class=fmt,
    )
    p.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
    p.add_argument("--model", default="deepfm", help="lr, fm, wide_deep, deepfm, dcnv2, dlrm")
    p.add_argument(
        "--model-opt",
        action="append",
        metavar="KEY=VALUE",
        help="model option, e.g. hidden=[256,128] (repeatable)",
    )
    p.add_argument("--compressor", default="full", help="method name (see `ctr methods`)")
    p.add_argument("--budget", default="1x", help="'10x', a fraction like 0.1, '25MB' or bytes")
    p.add_argument(
        "--method-opt",
        action="append",
        metavar="KEY=VALUE",
        help="method option, e.g. shared=true or storage=int8 (repeatable)",
    )
    p.add_argument("--dim", type=int, default=16, help="embedding dim of the model")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs (fractions allowed)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: >= 200 steps/epoch in 256..4096"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of dense parameters")
    p.add_argument(
        "--table-lr",
        type=float,
        default=None,
        help="lr of the embedding tables' optimizer (default: 0.05 for the Adagrad family and "
        "sgd, 1e-3 for adam)",
    )
    p.add_argument(
        "--table-optimizer",
        default="auto",
        choices=["auto", "rowwise_adagrad", "adagrad", "sgd", "adam"],
        help="optimizer of every embedding table: auto (default) is the method's "
        "(rowwise_adagrad, fbgemm's fused kernel; adam for optembed, pep, deeplight, dnis); "
        "adam is lazy sparse Adam outside fbgemm's CPU fused kernels, single process",
    )
    p.add_argument("--eval-every", type=int, default=0, help="steps between evals (0: per epoch)")
    p.add_argument("--patience", type=int, default=2, help="evals without improvement to stop")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (resumable)")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace a different run at --out")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (a line per stage instead)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export",
        help="export a finished run to a serving artifact",
        epilog=EPILOG_EXPORT,
        formatter_class=fmt,
    )
    p.add_argument("run", type=Path, help="a finished run directory (ctr train --out)")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--storage", default="", help="serve tables at fp16/int8/int4/int2 instead")
    p.add_argument("--overwrite", action="store_true", help="replace an artifact at --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "predict",
        help="predict a prepared split with an artifact",
        epilog=EPILOG_PREDICT,
        formatter_class=fmt,
    )
    p.add_argument("artifact", type=Path, help="an artifact directory (ctr export --out)")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
    p.add_argument("--split", default="test", help="train, valid or test")
    p.add_argument("--batch-size", type=int, default=16384, help="rows per forward")
    p.add_argument("--out", type=Path, default=None, help="CSV of prob,label")
    p.add_argument("--overwrite", action="store_true", help="replace a predictions CSV at --out")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "serve",
        help="serve an artifact over HTTP (micro-batching, metrics, hot swap)",
        epilog=EPILOG_SERVE,
        formatter_class=fmt,
    )
    p.add_argument("artifact", type=Path, help="an artifact, or a directory of artifact versions")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--max-batch", type=int, default=4096, help="rows per model forward")
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=0.0,
        help="wait this long for more rows (0: a batch is what queued during the last forward)",
    )
    p.add_argument("--max-rows", type=int, default=16384, help="rows per request (else 413)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="request body limit (413)")
    p.add_argument("--max-queue-rows", type=int, default=65536, help="rows waiting before 503s")
    p.add_argument("--poll-s", type=float, default=2.0, help="version-directory poll interval")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on the port (one a core), sharing the loaded tables; each "
        "has its own queue and /metrics",
    )
    p.add_argument(
        "--binary-decode",
        choices=("bits", "auto", "planes", "rows"),
        default="bits",
        help="binary artifacts: bits holds the artifact's bytes; auto/planes/rows serve fbgemm "
        "rows, faster and larger (/v1/metadata: resident_bytes)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "demo",
        help="the end-to-end default: synth -> train -> export -> predict",
        epilog=EPILOG_DEMO,
        formatter_class=fmt,
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output directory")
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows to generate")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous demo output at --out"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list compression methods and their options")
    p.set_defaults(func=cmd_methods)

    if prepare:
        from datasets.prepare.cli import add_prepare_parser

        add_prepare_parser(sub)
    else:
        sub.add_parser("prepare", help="turn a raw CTR dataset into the prepared format")
    add_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prepare="prepare" in argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
        if os.environ.get("CTR_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
