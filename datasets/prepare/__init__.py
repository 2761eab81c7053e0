"""``ctr prepare``: raw CTR datasets -> the prepared format (parquet shards + meta.json).

Example::

    from datasets.prepare import PrepareOptions, prepare_criteo
    meta = prepare_criteo(["train.txt"], "data/criteo", options=PrepareOptions(min_count=10))
    meta.rows("train"), meta.bad_rows
"""

from datasets.prepare.engine import PrepareOptions
from datasets.prepare.sources import BadInputError
from datasets.readers.avazu import AvazuFormat, prepare_avazu
from datasets.readers.criteo import CriteoConfig, CriteoDays, CriteoFormat, prepare_criteo
from datasets.readers.kdd12 import Kdd12Config, Kdd12Format, prepare_kdd12
from datasets.readers.movielens import MovieLensConfig, MovieLensFormat, prepare_movielens
from datasets.readers.table import TableFormat, TableSchema, prepare_table

__all__ = [
    "AvazuFormat",
    "BadInputError",
    "CriteoConfig",
    "CriteoDays",
    "CriteoFormat",
    "Kdd12Config",
    "Kdd12Format",
    "MovieLensConfig",
    "MovieLensFormat",
    "PrepareOptions",
    "TableFormat",
    "TableSchema",
    "prepare_avazu",
    "prepare_criteo",
    "prepare_kdd12",
    "prepare_movielens",
    "prepare_table",
]
