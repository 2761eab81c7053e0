"""``ctr demo``: synthetic data -> DeepFM -> artifacts -> predictions, the end-to-end default."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ctr.cli.common import HelpFormatter

HELP = {"demo": "the end-to-end default: synth -> train -> export -> predict"}
EPILOG_DEMO = """example:
  ctr demo --out demo-output            # synthetic data -> DeepFM -> artifact -> predictions"""
DEMO_ROWS = 1_000_000
DEMO_ENTRIES = {
    "data",
    "run-deepfm-full",
    "artifact-deepfm-fp32",
    "artifact-deepfm-int8",
    "predictions-fp32.csv",
    "predictions-int8.csv",
}


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("demo", help=HELP["demo"], epilog=EPILOG_DEMO, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output directory")
    p.add_argument("--rows", type=int, default=DEMO_ROWS, help="synthetic rows to generate")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous demo output at --out"
    )
    p.set_defaults(func=cmd_demo)


def _is_demo_output(path: Path) -> bool:
    from datasets.io import only_names
    from datasets.prepared import is_prepared_dataset

    return only_names(path, DEMO_ENTRIES) and is_prepared_dataset(path / "data")


def cmd_demo(args: argparse.Namespace) -> int:
    from datasets.io import replace_dir

    started = time.perf_counter()
    # In place: the run and artifacts record absolute paths of what lies beside them.
    with replace_dir(args.out, "demo output", _is_demo_output, args.overwrite, in_place=True):
        _demo(Path(args.out), args.rows)
    print(f"demo finished in {time.perf_counter() - started:.0f}s; outputs under {args.out}/")
    return 0


def _parse(argv: list[str]) -> argparse.Namespace:
    """``ctr synth|train ...`` parsed as the command line would, defaults included."""
    from ctr.cli import synth, train

    parser = argparse.ArgumentParser(prog="ctr")
    sub = parser.add_subparsers(dest="command", required=True)
    synth.add_parsers(sub)
    train.add_parsers(sub)
    return parser.parse_args(argv)


def _demo(out: Path, rows: int) -> None:
    from ctr.cli.synth import cmd_synth
    from ctr.cli.train import cmd_export, cmd_predict, cmd_train

    data = out / "data"
    cmd_synth(_parse(["synth", "--rows", str(rows), "--scale", "0.01", "--out", str(data)]))
    run = out / "run-deepfm-full"
    train_args = _parse(
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
        cmd_export(_parse(["export", str(run), "--out", str(target), "--storage", storage]))
        predictions = out / f"predictions-{name}.csv"
        cmd_predict(
            _parse(["predict", str(target), "--data", str(data), "--out", str(predictions)])
        )
