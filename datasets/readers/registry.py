"""The registry of raw formats: ``ctr prepare``'s subcommands and the formats serving rebuilds.

Adding a raw format is one module and one line: write ``datasets/readers/<name>.py`` (a
``Format`` subclass, a ``prepare_<name>`` function and a module-level ``READER`` record,
see :mod:`datasets.readers.base`) and add ``"<name>"`` to :data:`MODULES`. ``ctr prepare
<name>`` and :func:`datasets.encode.format_for_meta` then find it here.

Imports run one way: ``datasets.encode -> datasets.readers -> datasets.prepare ->
datasets.{prepared, io, progress, prefetch, synthetic}``; the engine never imports a reader.

Example::

    reader = READERS["criteo"]
    reader.format.name, reader.splits, reader.min_count
"""

from __future__ import annotations

from importlib import import_module

from datasets.prepare.base import Format
from datasets.readers.base import Reader

#: the reader modules under ``datasets/readers/``, in ``ctr prepare --help`` order
MODULES = ("criteo", "avazu", "kdd12", "movielens", "table")


def load(module: str) -> Reader:
    """The ``READER`` of ``datasets.readers.<module>``."""
    reader = getattr(import_module(f"datasets.readers.{module}"), "READER", None)
    if not isinstance(reader, Reader):
        raise TypeError(f"datasets.readers.{module} has no READER (a datasets.readers.base.Reader)")
    return reader


#: name -> reader, from each module's ``READER``
READERS: dict[str, Reader] = {r.name: r for r in map(load, MODULES)}


def format_class(name: str) -> type[Format] | None:
    """The :class:`Format` class of a registered raw format, or None."""
    reader = READERS.get(name)
    return reader.format if reader is not None else None
