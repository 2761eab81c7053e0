"""What every ``ctr`` command shares: the help formatter, value parsing, and flags whose
default (and type) is a dataclass field's, so that a default is written once, in the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and each option's default after its help (unless the help
    already states it, or there is none to state)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # ``is``, not ``in``: a default of 0 or 1 equals False or True and is still stated.
        if (
            not action.option_strings
            or any(action.default is x for x in (None, False, True))
            or action.default == argparse.SUPPRESS
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: %(default)s)"


def parse_value(text: str) -> Any:
    """JSON when it parses (``3``, ``true``, ``[16,8]``), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``["a=1", "b-c=x"]`` -> ``{"a": 1, "b_c": "x"}``; a pair without ``=`` is an error
    naming ``flag``."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"{flag} expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def parse_budget(text: str) -> str | float | int:
    """A budget as the compressors take it: a number stays a number, ``10x``/``25MB`` text."""
    value = parse_value(text)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def field_default(config: type, name: str) -> Any:
    """The default of dataclass ``config``'s field ``name`` (its factory called)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{config.__name__}.{name} has no default")
    raise ValueError(f"{config.__name__} has no field {name!r}")


def add_field(
    parser: argparse.ArgumentParser, config: type, name: str, help: str, **kwargs: Any
) -> argparse.Action:
    """``--name-with-dashes`` for field ``name`` of dataclass ``config``: its default is the
    field's, its type the default's (give ``type=`` when the default is None)."""
    default = field_default(config, name)
    kwargs.setdefault("type", type(default))
    return parser.add_argument(
        f"--{name.replace('_', '-')}", dest=name, default=default, help=help, **kwargs
    )


def add_fields(
    parser: argparse.ArgumentParser, config: type, helps: dict[str, str], **types: Any
) -> None:
    """:func:`add_field` for each ``name: help`` of ``helps`` (``types``: a type per name
    whose default is None)."""
    for name, text in helps.items():
        extra = {"type": types[name]} if name in types else {}
        add_field(parser, config, name, text, **extra)


def config_values(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """``{name: args.name}``: the parsed values of the flags :func:`add_fields` added."""
    return {name: getattr(args, name) for name in names}
