"""The compressor registry: methods by name, serving modules by export kind.

Example::

    layer = build_compressor("full", features, dim=16, budget="1x")
    available()  # ['full', ...]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from compressors.core.base import Compressor, ExportedEmbedding, FeatureSpec, full_bytes
from compressors.core.budget import Budget, parse_budget

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


def method_options(name: str) -> dict[str, Any]:
    """The keyword arguments a method accepts, with their defaults."""
    cls = _lookup(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[4:]
    return {
        p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY or p.default is not p.empty
    }


def build_compressor(
    name: str, features: Sequence[FeatureSpec], dim: int, budget: Budget = "1x", **options: Any
) -> Compressor:
    """Builds method ``name`` for ``features`` at ``dim`` under ``budget`` (see budget.py)."""
    cls = _lookup(name)
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"compressor {name!r} has no options {unknown}; it accepts {sorted(allowed) or 'none'}"
        )
    budget_bytes = parse_budget(budget, full_bytes(features, dim))
    return cls(features, dim, budget_bytes, **options)


def build_serving(exported: ExportedEmbedding) -> nn.Module:
    if exported.kind not in SERVING:
        raise ValueError(
            f"no serving module for export kind {exported.kind!r}; known: {sorted(SERVING)}"
        )
    return SERVING[exported.kind](exported)


def _lookup(name: str) -> type[Compressor]:
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(available())}")
    return COMPRESSORS[name]
