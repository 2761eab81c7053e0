"""Compression methods for embedding tables, grouped by family (the folder names are the
catalogue):

- ``core/`` — the contract every method implements (``base.py``), the registry, budgets,
  physical tables (``storage.py``), index maps and combiners (``layout.py``) and the shared
  bases of table-based (``tables.py``) and table-less (``hybrid.py``) methods;
- ``baseline/`` — ``full``;
- ``hashing/`` — inter-feature methods: hash, unified, qr, adapt, tt, robe, dhe;
- ``precision/`` — ptq, int8/int16 training, alpt, binary;
- ``pruning/`` — row and entry pruning (OptEmbed, PEP, DeepLight);
- ``dimension/`` — dimension search (DNIS, MDE, AutoDim).

Adding a method is one module in its family's folder: a ``Compressor`` subclass decorated
with ``@register`` (and ``@register_serving`` for a new export kind), imported by the
family's ``__init__.py``. Nothing else changes.

Example::

    from compressors import FeatureSpec, build_compressor
    layer = build_compressor("full", [FeatureSpec("C1", 1000)], dim=16, budget="1x")
"""

# Importing a family registers its methods.
from compressors import baseline, dimension, hashing, precision, pruning  # noqa: F401
from compressors.core.base import (
    Compressor,
    ExportedEmbedding,
    FeatureSpec,
    MemoryReport,
    Plan,
    Stage,
    full_bytes,
)
from compressors.core.budget import BudgetError, parse_budget
from compressors.core.options import OptionError, OptionSpec
from compressors.core.registry import (
    available,
    build_compressor,
    build_from_plan,
    build_serving,
    method_options,
    option_spec,
    options_type,
    register,
    register_serving,
    solve,
)
from compressors.core.tables import TABLE_KIND, TableMethod, TableServing

register_serving(TABLE_KIND)(TableServing)

__all__ = [
    "BudgetError",
    "Compressor",
    "ExportedEmbedding",
    "FeatureSpec",
    "MemoryReport",
    "OptionError",
    "OptionSpec",
    "Plan",
    "Stage",
    "TableMethod",
    "available",
    "build_compressor",
    "build_from_plan",
    "build_serving",
    "full_bytes",
    "method_options",
    "option_spec",
    "options_type",
    "parse_budget",
    "register",
    "solve",
]
