"""What a raw format declares to be listed in the registry and get a ``ctr prepare`` subcommand.

A reader module holds the format's :class:`~datasets.prepare.engine.Format` (columns and a
vectorised transform), its ``prepare_<name>`` function, and a module-level ``READER``: this
record, which names the format, gives its help and example, adds its own command-line
arguments and turns the parsed arguments into a prepared dataset. ``ctr prepare`` adds the
options every format shares (``--out``, ``--min-count``, ``--split``, ...) itself and passes
them in as :class:`~datasets.prepare.engine.PrepareOptions`.

Example::

    READER = Reader(
        name="avazu",
        format=AvazuFormat,
        help="Avazu train.csv (CSV with header)",
        example="ctr prepare avazu train.csv --out data/avazu",
        add_arguments=lambda p: p.add_argument("paths", nargs="+", metavar="PATH"),
        prepare=lambda args, options: prepare_avazu(args.paths, args.out, options),
        min_count=5,
    )
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from datasets.prepare.base import Format, PrepareOptions
from datasets.prepared import DatasetMeta


@dataclass(frozen=True)
class Reader:
    """One raw format in the registry (:data:`datasets.readers.registry.READERS`).

    Options:
        name: the subcommand (``ctr prepare <name>``) and ``meta.json``'s ``format``; equal
            to ``format.name``.
        format: the :class:`Format` class, rebuilt from ``meta.json`` to encode raw values
            at serving time.
        help: one line for ``ctr prepare --help`` and the subcommand's description.
        example: the subcommand's example command line(s).
        add_arguments: adds the format's own arguments (its paths included).
        prepare: ``(parsed arguments, options) -> DatasetMeta``; ``args.out`` is the output.
        splits: the ``--split`` choices, the default first.
        min_count: the default ``--min-count``.
    """

    name: str
    format: type[Format]
    help: str
    example: str
    add_arguments: Callable[[argparse.ArgumentParser], object]
    prepare: Callable[[argparse.Namespace, PrepareOptions], DatasetMeta]
    splits: tuple[str, ...] = ("random", "ordered")
    min_count: int = 1

    def __post_init__(self) -> None:
        if self.name != self.format.name:
            raise ValueError(f"reader {self.name!r} names format {self.format.name!r}")


def names(text: str) -> tuple[str, ...]:
    """A comma-separated argument as its non-empty names."""
    return tuple(n.strip() for n in text.split(",") if n.strip())
