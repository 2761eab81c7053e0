"""Compression methods for embedding tables: one module per method family, a registry,
budget solving and memory accounting.

Example::

    from compressors import FeatureSpec, build_compressor
    layer = build_compressor("full", [FeatureSpec("C1", 1000)], dim=16, budget="1x")
"""

# Importing a method module registers it.
from compressors import (  # noqa: F401
    adapt,
    alpt,
    binary,
    dhe,
    full,
    hashing,
    integer,
    ptq,
    qr,
    robe,
    tt,
)
from compressors.base import (
    Compressor,
    ExportedEmbedding,
    FeatureSpec,
    MemoryReport,
    Stage,
    full_bytes,
)
from compressors.budget import BudgetError, parse_budget
from compressors.registry import (
    available,
    build_compressor,
    build_serving,
    method_options,
    register,
    register_serving,
)
from compressors.tables import TABLE_KIND, TableMethod, TableServing

register_serving(TABLE_KIND)(TableServing)

__all__ = [
    "BudgetError",
    "Compressor",
    "ExportedEmbedding",
    "FeatureSpec",
    "MemoryReport",
    "Stage",
    "TableMethod",
    "available",
    "build_compressor",
    "build_serving",
    "full_bytes",
    "method_options",
    "parse_budget",
    "register",
]
