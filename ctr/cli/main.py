"""The ``ctr`` command line: synth, train, export, predict, serve, demo, methods, prepare,
sweep.

Each command group lives in its own module (:mod:`ctr.cli.synth`, :mod:`ctr.cli.train`,
:mod:`ctr.cli.serve`, :mod:`ctr.cli.demo`, :mod:`ctr.cli.sweep`, ``ctr prepare`` in
:mod:`ctr.cli.prepare`), whose ``add_parsers`` adds its subcommands with defaults read from
the configs they fill. :func:`main` builds in full only the group of the command it runs, so
``ctr --help`` and ``ctr synth`` import neither torch nor the raw-format readers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from ctr.cli import demo, serve, sweep, synth, train


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


def _add_methods(sub: Any) -> None:
    sub.add_parser("methods", help=METHODS_HELP["methods"]).set_defaults(func=cmd_methods)


def _add_prepare(sub: Any) -> None:
    from ctr.cli.prepare import add_prepare_parser

    add_prepare_parser(sub)


METHODS_HELP = {"methods": "list compression methods and their options"}
PREPARE_HELP = {"prepare": "turn a raw CTR dataset into the prepared format"}
# Each group: its commands' one-line helps (listed without building the group) and the
# function that adds its parsers in full. Order is the order of `ctr --help`.
GROUPS: tuple[tuple[dict[str, str], Callable[[Any], None]], ...] = (
    (synth.HELP, synth.add_parsers),
    (train.HELP, train.add_parsers),
    (serve.HELP, serve.add_parsers),
    (demo.HELP, demo.add_parsers),
    (METHODS_HELP, _add_methods),
    (PREPARE_HELP, _add_prepare),
    (sweep.HELP, sweep.add_parsers),
)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``ctr`` parser. ``commands``: the commands whose groups are built in full (their
    flags, defaults and help; None: every group); the others are listed by name and help
    only, so that listing them imports none of what they need (torch, pyarrow, the server)."""
    parser = argparse.ArgumentParser(
        prog="ctr",
        description="Train, compress and serve CTR embedding tables.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for helps, add in GROUPS:
        if commands is None or not set(helps).isdisjoint(commands):
            add(sub)
        else:
            for name, text in helps.items():
                sub.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(commands=argv[:1]).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
        if os.environ.get("CTR_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
