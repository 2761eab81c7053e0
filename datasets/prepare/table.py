"""Moved to ``datasets.readers.table``; this name stays for one release."""

from datasets.readers.table import (  # noqa: F401
    NUMERIC_AS,
    TABLE_FORMATS,
    TableFormat,
    TableSchema,
    prepare_table,
    read_schema_file,
)
