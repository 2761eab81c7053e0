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
- ``codebook/`` — codes into learned codebooks (DPQ, MGQE) and block deduplication (Dedup).

Adding a method is one module in its family's folder, nothing else:

1. a ``Compressor`` subclass with a ``name``, decorated with ``@register`` (and
   ``@register_serving`` for a new export kind); subclass ``TableMethod`` and implement
   ``solve_layout()`` when the storage is tables (export, serving, memory and plans come
   with it), or ``HybridMethod`` for a table-less module;
2. its constructor's keyword arguments after ``(features, dim, budget_bytes)`` are its typed
   options (annotation + default), with help text in the class's ``option_help``;
3. ``stages`` and the hooks of ``core/base.py`` (rewind, bilevel, rebuild, searches) when it
   trains in several steps;
4. import the module in the family's ``__init__.py``.

``tests/contract/test_contract.py`` then tests it (budgets, ``solve()`` bytes, export, resume, DMP,
options); ``compressors/catalog.json`` (what ``ctr methods`` prints) refreshes itself.
``solve(name, features, dim, budget, **options)`` gives a method's plan and exact bytes
without building it; ``build_from_plan`` builds exactly what a plan describes.

Example::

    from compressors import FeatureSpec, build_compressor
    layer = build_compressor("full", [FeatureSpec("C1", 1000)], dim=16, budget="1x")
    plan = solve("hash", [FeatureSpec("C1", 1000)], dim=16, budget="10x")  # no weights
    plan.serve_bytes, plan.details["layout"]["tables"]
"""

# Importing a family registers its methods.
from compressors import baseline, codebook, dimension, hashing, precision, pruning  # noqa: F401
from compressors.codebook.pq import KIND as CODEBOOK_KIND
from compressors.codebook.pq import CodebookPlan, CodebookServing, pack_codes
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
    COMPRESSORS,
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
from compressors.core.storage import Lookup, ServeTables, TableSpec, pack_rows
from compressors.core.tables import TABLE_KIND, TableMethod, TableServing
from compressors.precision.binary import BinaryServing, binarize, binary_export
from compressors.pruning.remap import RemapMap, build_bitmap, build_remap

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

# Serving building blocks, public for tools that assemble serving modules from their own
# tables (bench/lookups.py): physical tables, binary and codebook serving, pruned-row indexes,
# and the registry of methods by name (a method's class attributes, e.g. default_optimizer).
__all__ += [
    "CODEBOOK_KIND",
    "COMPRESSORS",
    "BinaryServing",
    "CodebookPlan",
    "CodebookServing",
    "Lookup",
    "RemapMap",
    "ServeTables",
    "TableSpec",
    "binarize",
    "binary_export",
    "build_bitmap",
    "build_remap",
    "pack_codes",
    "pack_rows",
]
