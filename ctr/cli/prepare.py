"""``ctr prepare <format>``: the command-line face of preprocessing, one subcommand per reader.

The subcommands are built from the readers registry
(:data:`datasets.readers.registry.READERS`): each reader adds its own arguments and this
module adds the options every format shares, turns them into
:class:`~datasets.prepare.engine.PrepareOptions` and reports bad input as one line. The main
``ctr`` CLI calls :func:`add_prepare_parser` on its subparsers and then ``args.func(args)``,
which returns the exit code.

Example::

    parser = argparse.ArgumentParser(prog="ctr")
    add_prepare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", "criteo", "train.txt", "--out", "data/criteo"])
    sys.exit(args.func(args))
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from datasets.prepare.base import BAD_ROW_POLICIES, EXECUTORS, PrepareOptions
from datasets.prepare.sources import BadInputError
from datasets.readers.base import Reader
from datasets.readers.registry import READERS


def add_prepare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``prepare`` and a subcommand per registered reader; each sets ``func`` -> exit
    code."""
    prepare = subparsers.add_parser(
        "prepare",
        help="turn a raw CTR dataset into the prepared format",
        description="Turn a raw CTR dataset into parquet shards + meta.json: two streaming "
        "passes, frequency-ordered ids (0 = OOV), bad rows counted and reported.",
    )
    formats = prepare.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name, reader in READERS.items():
        sub = formats.add_parser(
            name,
            help=reader.help,
            description=reader.help,
            epilog=f"example:\n  {reader.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        reader.add_arguments(sub)
        _common(sub, list(reader.splits), reader.min_count)
        # Not `format`: `prepare table` has a --format flag that would shadow the name.
        sub.set_defaults(prepare_format=name, func=_run(reader))
    return prepare


def _common(p: argparse.ArgumentParser, split_choices: list[str], min_count: int) -> None:
    d = PrepareOptions()  # the defaults, stated once
    fractions = ",".join(f"{x:g}" for x in d.fractions)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--min-count",
        type=int,
        default=None,
        help=f"values seen fewer times in train become OOV (default {min_count})",
    )
    p.add_argument(
        "--split",
        choices=split_choices,
        default=None,
        help=f"how rows are split into train/valid/test (default: {split_choices[0]})",
    )
    p.add_argument(
        "--fractions",
        default=fractions,
        help=f"train,valid,test shares for --split random|ordered (default {fractions})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random split")
    p.add_argument(
        "--on-bad-row",
        choices=BAD_ROW_POLICIES,
        default=d.on_bad_row,
        help="skip (and report) malformed rows, or fail at the first one",
    )
    p.add_argument(
        "--max-dropped-fraction",
        type=float,
        default=d.max_dropped_fraction,
        metavar="F",
        help="fail (and write no meta.json) when more than this share of the lines are bad "
        f"rows, e.g. a truncated file of a join (default {d.max_dropped_fraction:g}; "
        "1 = never)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--block-mb",
        type=int,
        default=d.block_bytes >> 20,
        help=f"raw megabytes read per chunk (default {d.block_bytes >> 20})",
    )
    p.add_argument(
        "--rows-per-shard",
        type=int,
        default=d.rows_per_shard,
        help=f"rows per parquet shard (default {d.rows_per_shard})",
    )
    p.add_argument(
        "--workers",
        default=str(d.workers),
        metavar="N",
        help="processes (or Ray tasks in flight) for both passes; the dataset is the one a "
        f"single process writes (default {d.workers}: one process)",
    )
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=d.executor,
        help="local: processes on this machine; ray: tasks on a Ray cluster whose nodes see "
        "the input and --out paths (default local)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address for --executor ray (default: a private local instance)",
    )


def _run(reader: Reader) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            options = PrepareOptions(
                min_count=args.min_count,
                split=args.split,
                fractions=_fractions(args.fractions),
                seed=args.seed,
                on_bad_row=args.on_bad_row,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                block_bytes=args.block_mb << 20,
                rows_per_shard=args.rows_per_shard,
                max_dropped_fraction=args.max_dropped_fraction,
                workers=_workers(args.workers),
                executor=args.executor,
                address=args.address,
            )
            reader.prepare(args, options)
        except (BadInputError, ValueError, OSError) as e:
            print(f"ctr prepare {args.prepare_format}: error: {e}", file=sys.stderr)
            return 2
        return 0

    return run


def _workers(text: str) -> int:
    # Parsed here, not by argparse, so a bad value is one line like every other error.
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ValueError(f"--workers needs a whole number of processes >= 1, got {text!r}")
    return workers


def _fractions(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"--fractions needs three comma-separated numbers, got {text!r}")
    return tuple(float(x) for x in parts)
