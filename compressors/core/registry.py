"""The compressor registry: methods by name, serving modules by export kind.

Example::

    layer = build_compressor("full", features, dim=16, budget="1x")
    available()  # ['full', ...]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from compressors.core.base import (
    Compressor,
    ExportedEmbedding,
    FeatureSpec,
    Plan,
    PlanContext,
    full_bytes,
    plan_context,
)
from compressors.core.budget import Budget, parse_budget
from compressors.core.options import OptionSpec, check_options, option_specs, options_dataclass

COMPRESSORS: dict[str, type[Compressor]] = {}
SERVING: dict[str, Callable[[ExportedEmbedding], nn.Module]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: makes a method available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in COMPRESSORS and COMPRESSORS[cls.name] is not cls:
        raise ValueError(f"compressor {cls.name!r} registered twice")
    COMPRESSORS[cls.name] = cls
    return cls


def register_serving(kind: str) -> Callable:
    """Decorator: ``kind`` of an :class:`ExportedEmbedding` -> the module that serves it."""

    def wrap(builder: Callable[[ExportedEmbedding], nn.Module]) -> Callable:
        SERVING[kind] = builder
        return builder

    return wrap


def available() -> list[str]:
    return sorted(COMPRESSORS)


def option_spec(name: str) -> list[OptionSpec]:
    """Method ``name``'s options: name, type, default and help (from its constructor)."""
    return option_specs(_lookup(name))


def method_options(name: str) -> dict[str, Any]:
    """The keyword arguments a method accepts, with their defaults."""
    return {s.name: s.default for s in option_spec(name)}


def options_type(name: str) -> type:
    """Method ``name``'s options as a dataclass (help text in each field's metadata)."""
    return options_dataclass(name, option_spec(name))


def solve(
    name: str,
    features: Sequence[FeatureSpec],
    dim: int,
    budget: Budget = "1x",
    *,
    context: PlanContext | None = None,
    **options: Any,
) -> Plan:
    """What method ``name`` would build under ``budget``, with its exact bytes, without
    allocating any weights. Raises ``BudgetError`` when the budget cannot be met, and
    ``OptionError`` (a TypeError) for unknown or ill-typed options. ``context``: the run's
    optimizers (:class:`~compressors.core.base.PlanContext`; default: the one in effect).

    Example::

        plan = solve("hash", features, 16, "100x", shared=True)
        plan.serve_bytes, plan.details["layout"]["tables"]
    """
    cls = _lookup(name)
    check_options(name, option_specs(cls), options)
    budget_bytes = parse_budget(budget, full_bytes(features, dim))
    with _context(context):
        return cls.solve(features, dim, budget_bytes, options)


def build_compressor(
    name: str,
    features: Sequence[FeatureSpec],
    dim: int,
    budget: Budget = "1x",
    *,
    context: PlanContext | None = None,
    **options: Any,
) -> Compressor:
    """Builds method ``name`` for ``features`` at ``dim`` under ``budget`` (see budget.py),
    planned for ``context`` (the run's optimizers; default: the one in effect)."""
    cls = _lookup(name)
    check_options(name, option_specs(cls), options)
    budget_bytes = parse_budget(budget, full_bytes(features, dim))
    with _context(context):
        method = cls(features, dim, budget_bytes, **options)
    method.options = dict(options)
    return method


def build_from_plan(
    plan: Plan, features: Sequence[FeatureSpec], context: PlanContext | None = None
) -> Compressor:
    """Builds the method ``plan`` describes (from ``solve()`` or a run's ``plan.json``);
    raises ValueError when this version's solver would build something else."""
    method = build_compressor(
        plan.method, features, plan.dim, plan.budget_bytes, context=context, **plan.options
    )
    method.check_plan(plan)
    return method


def build_serving(
    exported: ExportedEmbedding, options: Mapping[str, Mapping[str, Any]] | None = None
) -> nn.Module:
    """The serving module of ``exported``; ``options`` maps an export kind to its serving
    options (e.g. ``{"binary": {"decode": "auto"}}``), other kinds' entries are ignored."""
    if exported.kind not in SERVING:
        raise ValueError(
            f"no serving module for export kind {exported.kind!r}; known: {sorted(SERVING)}"
        )
    return SERVING[exported.kind](exported, **dict((options or {}).get(exported.kind, {})))


def _context(context: PlanContext | None) -> Any:
    """``context`` in effect, or the one already in effect when None."""
    return plan_context(context) if context is not None else contextlib.nullcontext()


def _lookup(name: str) -> type[Compressor]:
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(available())}")
    return COMPRESSORS[name]
