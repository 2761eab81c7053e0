"""Moved to :mod:`compressors.pruning.entry_table` (training storage),
:mod:`~compressors.pruning.bytes` (byte arithmetic), :mod:`~compressors.pruning.remap` (index
maps) and :mod:`~compressors.pruning.serving` (the ``pruned`` export); this name stays for one
release."""

from compressors.pruning.bytes import (  # noqa: F401
    CSR_DTYPES,
    CSR_SCALE_BYTES,
    FORMS,
    INT8_MAX,
    INT16_MAX,
    RANK_BLOCK,
    RANK_BLOCK_BYTES,
    FieldPlan,
    bitmap_bytes,
    cheapest_entry_plan,
    csr_bytes,
    csr_entry_bytes,
    csr_fixed_bytes,
    dim_choices,
    index_bytes,
    max_csr_entries,
    min_dim,
    remap_bytes,
    remap_form,
    row_plan,
)
from compressors.pruning.entry_table import EntryTable, row_optimizer  # noqa: F401
from compressors.pruning.remap import (  # noqa: F401
    POPCOUNT,
    RankBitmap,
    RemapMap,
    bitmap_lookup,
    build_bitmap,
    build_remap,
)
from compressors.pruning.serving import (  # noqa: F401
    PRUNED_KIND,
    PrunedServing,
    SparseFields,
    export_pruned,
    pack_csr,
)
