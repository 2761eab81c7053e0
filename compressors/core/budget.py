"""Memory budgets: ``"10x"`` (ratio to the full fp32 table), ``0.1`` (fraction), ``"25MB"``, bytes.

Units are decimal (``kB`` = 1e3, ``MB`` = 1e6, ``GB`` = 1e9) and binary (``KiB``, ``MiB``, ``GiB``).

Example::

    parse_budget("10x", full_bytes=64_000_000)   # 6_400_000
    parse_budget(0.25, full_bytes=64_000_000)    # 16_000_000
    parse_budget("25MB", full_bytes=64_000_000)  # 25_000_000
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
_RATIO = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*x\s*$", re.IGNORECASE)

Budget = str | int | float


class BudgetError(ValueError):
    """A budget that cannot be parsed or cannot be met."""


def parse_budget(budget: Budget, full_bytes: int) -> int:
    """Returns the budget in bytes for embeddings whose full fp32 size is ``full_bytes``."""
    if full_bytes <= 0:
        raise BudgetError(f"full table size must be positive, got {full_bytes}")
    if isinstance(budget, bool):
        raise BudgetError(f"budget must be a ratio, fraction or size, got {budget!r}")
    if isinstance(budget, int):
        return _bytes(budget, repr(budget))
    if isinstance(budget, float):
        return _fraction(budget, full_bytes, repr(budget))
    if not isinstance(budget, str):
        raise BudgetError(f"budget must be a str, int or float, got {type(budget).__name__}")
    text = budget.strip()
    if m := _RATIO.match(text):
        ratio = float(m.group(1))
        if not math.isfinite(ratio) or ratio < 1.0:
            raise BudgetError(f"budget {budget!r}: a compression ratio must be at least 1x")
        return max(1, math.floor(full_bytes / ratio))
    if m := _SIZE.match(text):
        unit = m.group(2).lower()
        if unit not in _UNITS:
            raise BudgetError(
                f"budget {budget!r}: unknown unit {m.group(2)!r}; use one of "
                "B, kB, MB, GB, KiB, MiB, GiB, or a ratio like '10x'"
            )
        return _bytes(float(m.group(1)) * _UNITS[unit], budget)
    try:
        number = float(text)
    except ValueError:
        raise BudgetError(
            f"budget {budget!r} is not understood; examples: '10x', '0.1', '25MB', '1048576'"
        ) from None
    if number.is_integer() and number > 1:
        return _bytes(number, budget)
    return _fraction(number, full_bytes, budget)


def _fraction(value: float, full_bytes: int, shown: str) -> int:
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise BudgetError(f"budget {shown}: a fraction of the full table must lie in (0, 1]")
    return max(1, math.floor(full_bytes * value))


def _bytes(value: float, shown: str) -> int:
    if not math.isfinite(value) or value < 1:
        raise BudgetError(f"budget {shown}: a size must be at least 1 byte")
    return int(value)


def describe_bytes(n: int) -> str:
    """``12_345_678`` -> ``'12.35 MB'``."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
