"""Moved to ``datasets.prepared``; this name stays for one release."""

from datasets.io import atomic_write_text, file_sha256, only_names  # noqa: F401
from datasets.prepared import (  # noqa: F401
    FORMAT_NAME,
    FORMAT_VERSION,
    FREQUENCIES_FILE,
    SHARD_NAME,
    SPLITS,
    VOCAB_FILE,
    DatasetMeta,
    PreparedDataError,
    ShardWriter,
    SparseField,
    SplitInfo,
    arrow_schema,
    encoded_counts,
    frequency_order,
    is_prepared_dataset,
    iter_tables,
    load_vocab,
    save_frequencies,
    save_vocab,
)
