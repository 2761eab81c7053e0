"""Moved to ``datasets.readers.avazu``; this name stays for one release."""

from datasets.readers.avazu import (  # noqa: F401
    AVAZU_COLUMNS,
    DEFAULT_MIN_COUNT,
    HOUR_FORMAT,
    AvazuConfig,
    AvazuFormat,
    prepare_avazu,
    split_hour,
)
