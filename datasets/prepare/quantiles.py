"""Moved to ``datasets.readers.quantiles``; this name stays for one release."""

from datasets.readers.quantiles import (  # noqa: F401
    RESERVOIR_SIZE,
    ZERO_TOKEN,
    NumericSketch,
    QuantileBuckets,
    bucket_field,
)
