import re

import pytest

from compressors.core.budget import BudgetError, describe_bytes, parse_budget

FULL = 64_000_000


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("10x", 6_400_000),
        ("1x", FULL),
        ("2.5x", 25_600_000),
        ("  100X ", 640_000),
        (0.25, 16_000_000),
        ("0.25", 16_000_000),
        (1.0, FULL),
        ("25MB", 25_000_000),
        ("25 mb", 25_000_000),
        ("1MiB", 1_048_576),
        ("1.5kB", 1_500),
        (1_048_576, 1_048_576),
        ("1048576", 1_048_576),
        ("3e6B", 3_000_000),
    ],
)
def test_parse_budget_forms(budget, expected):
    assert parse_budget(budget, FULL) == expected


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("0.5x", "at least 1x"),
        ("0x", "at least 1x"),
        ("abc", "not understood"),
        ("10 parsecs", "unknown unit"),
        (0.0, "(0, 1]"),
        (1.5, "(0, 1]"),
        (-3, "at least 1 byte"),
        ("-0.1", "(0, 1]"),
        (True, "ratio, fraction or size"),
        ([10], "str, int or float"),
        ("nanx", "not understood"),
    ],
)
def test_parse_budget_errors_are_clear(budget, message):
    with pytest.raises(BudgetError, match=re.escape(message)):
        parse_budget(budget, FULL)


def test_tiny_ratio_never_rounds_to_zero():
    assert parse_budget("1000000x", 1000) == 1


def test_describe_bytes():
    assert describe_bytes(12_345_678) == "12.35 MB"
    assert describe_bytes(999) == "999 B"
