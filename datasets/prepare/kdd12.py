"""Moved to ``datasets.readers.kdd12``; this name stays for one release."""

from datasets.readers.kdd12 import (  # noqa: F401
    DEFAULT_MIN_COUNT,
    KDD12_COLUMNS,
    KDD12_FEATURES,
    LABEL_MODES,
    Kdd12Config,
    Kdd12Format,
    prepare_kdd12,
)
