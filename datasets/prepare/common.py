"""Moved to ``datasets.prepare.engine`` (split into ``base``, ``splits`` and ``vocab``); this
name stays for one release."""

from datasets.prepare.base import BAD_ROW_POLICIES, LABEL, Format, PrepareOptions  # noqa: F401
from datasets.prepare.engine import (  # noqa: F401
    MAX_BLOCK_BYTES,
    BadRows,
    check_dropped,
    encode_block_bytes,
    encode_features,
    label_hint,
    prepare_dataset,
)
from datasets.prepare.splits import (  # noqa: F401
    END_OF_SOURCE,
    FileReader,
    SplitPlan,
    count_rows,
    global_ranges,
    ordered_split,
    random_split,
    standard_split,
)
from datasets.prepare.vocab import FieldVocab, ValueCounter, build_vocab  # noqa: F401
