"""Typed method options, read from each method's constructor (the single source of truth).

A method's options are the keyword parameters of its ``__init__`` after ``(features, dim,
budget_bytes)``: name, annotation and default come from the signature, the help text from the
class's ``option_help`` dict (merged along the class hierarchy, so a base documents the
options it introduces, e.g. ``storage``). A subclass whose ``__init__`` takes ``**options``
passes them on to its base and has the base's options too, less its ``fixed_options`` (those
it sets itself). :func:`options_dataclass` turns them into a
dataclass; :func:`check_options` validates a user's options against them, raising
:class:`OptionError` with one line naming the method and what it accepts. Nothing here
imports torch, so ``ctr methods`` can list options cheaply.

Example::

    specs = option_specs(Hash)           # [OptionSpec('shared', 'bool', False, '...'), ...]
    check_options("hash", specs, {"shared": "yes"})
    # OptionError: hash: option shared='yes' must be bool; it accepts: shared (bool=False), ...
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

# Parameters every method takes positionally before its options.
POSITIONAL = ("self", "features", "dim", "budget_bytes")
_SIMPLE = {"bool": bool, "int": int, "float": float, "str": str, "None": type(None)}


class OptionError(TypeError):
    """An unknown or ill-typed method option."""


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option of a method: its name, annotation (as written), default and help."""

    name: str
    type: str
    default: Any
    help: str = ""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` fits the annotation (unknown annotations accept anything)."""
        allowed = []
        for part in re.split(r"\s*\|\s*", self.type):
            base = part.split("[", 1)[0].strip()
            if base in ("Mapping", "dict"):
                allowed.append(dict)
            elif base in ("Sequence", "list", "tuple"):
                allowed.extend((list, tuple))
            elif base in _SIMPLE:
                allowed.append(_SIMPLE[base])
            else:
                return True
        if isinstance(value, bool):
            return bool in allowed
        if isinstance(value, int) and float in allowed:
            return True
        return isinstance(value, tuple(allowed))

    def describe(self) -> str:
        return f"{self.name} ({self.type}={self.default!r})"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def option_specs(cls: type) -> list[OptionSpec]:
    """The options of method class ``cls``: its own in signature order, then, when its
    ``__init__`` takes ``**options``, its base's (less those it sets itself, named in its
    ``fixed_options``)."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        helps.update(getattr(klass, "option_help", None) or {})
    specs = []
    passes_on = False
    for p in inspect.signature(cls.__init__).parameters.values():
        passes_on |= p.kind is p.VAR_KEYWORD
        if p.name in POSITIONAL or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TypeError(f"{cls.__name__}: option {p.name!r} needs a default")
        annotation = p.annotation if isinstance(p.annotation, str) else _type_name(p.annotation)
        specs.append(OptionSpec(p.name, annotation, p.default, helps.get(p.name, "")))
    if passes_on:
        base = next(k for k in cls.__mro__[1:] if "__init__" in vars(k))
        taken = {s.name for s in specs} | set(getattr(cls, "fixed_options", ()))
        specs += [
            dataclasses.replace(s, help=helps.get(s.name, s.help))
            for s in option_specs(base)
            if s.name not in taken
        ]
    return specs


def options_dataclass(name: str, specs: Sequence[OptionSpec]) -> type:
    """A frozen dataclass of the options (defaults set, help in each field's metadata)."""
    return dataclasses.make_dataclass(
        f"{name.title().replace('_', '')}Options",
        [
            (s.name, Any, dataclasses.field(default=s.default, metadata={"help": s.help}))
            for s in specs
        ],
        frozen=True,
    )


def check_options(method: str, specs: Sequence[OptionSpec], options: Mapping[str, Any]) -> None:
    """Raises :class:`OptionError` for an unknown option or a value of the wrong type."""
    by_name = {s.name: s for s in specs}
    accepted = ", ".join(s.describe() for s in specs) or "none"
    unknown = sorted(set(options) - set(by_name))
    if unknown:
        raise OptionError(f"compressor {method!r} has no options {unknown}; it accepts: {accepted}")
    for key, value in options.items():
        spec = by_name[key]
        if value != spec.default and not spec.accepts(value):
            raise OptionError(
                f"compressor {method!r}: option {key}={value!r} must be {spec.type}; "
                f"it accepts: {accepted}"
            )


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "Any"
    return getattr(annotation, "__name__", str(annotation))
