"""The preprocessing engine: raw chunks -> the prepared format (parquet shards + meta.json).

:mod:`datasets.prepare.engine` runs the two streaming passes every raw format shares,
:mod:`datasets.prepare.sources` reads raw files in chunks and :mod:`datasets.prepare.columns`
holds the vectorised column transforms the formats use. The raw formats themselves (and
``prepare_criteo`` & co.) live in :mod:`datasets.readers`, which imports this package and is
never imported by it.

Example::

    from datasets.prepare import PrepareOptions
    from datasets.readers.criteo import prepare_criteo
    meta = prepare_criteo(["train.txt"], "data/criteo", options=PrepareOptions(min_count=10))
    meta.rows("train"), meta.bad_rows
"""

from importlib import import_module
from typing import Any

from datasets.prepare.engine import PrepareOptions
from datasets.prepare.sources import BadInputError

#: names that moved to ``datasets.readers.<module>``; importable from here for one release
_MOVED = {
    "AvazuFormat": "avazu",
    "prepare_avazu": "avazu",
    "CriteoConfig": "criteo",
    "CriteoDays": "criteo",
    "CriteoFormat": "criteo",
    "prepare_criteo": "criteo",
    "Kdd12Config": "kdd12",
    "Kdd12Format": "kdd12",
    "prepare_kdd12": "kdd12",
    "MovieLensConfig": "movielens",
    "MovieLensFormat": "movielens",
    "prepare_movielens": "movielens",
    "TableFormat": "table",
    "TableSchema": "table",
    "prepare_table": "table",
}

__all__ = ["BadInputError", "PrepareOptions", *_MOVED]


def __getattr__(name: str) -> Any:
    # Resolved on first use, so importing the engine never imports a reader.
    if name in _MOVED:
        return getattr(import_module(f"datasets.readers.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
