"""Moved to ``datasets.readers.criteo``; this name stays for one release."""

from datasets.readers.criteo import (  # noqa: F401
    CRITEO_COLUMNS,
    CRITEO_DENSE,
    CRITEO_SPARSE,
    DEFAULT_MIN_COUNT,
    CriteoConfig,
    CriteoDays,
    CriteoFormat,
    kaggle_day_bounds,
    prepare_criteo,
)
