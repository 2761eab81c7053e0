"""Vectorised per-column transforms shared by every format and by :class:`RawEncoder`.

A format's ``transform`` is written only in terms of these functions, applied to whole
chunks of raw string columns, so the streaming preprocessing and the serving-time encoder
run the same code on the same raw values.

Example::

    issues = Issues(rows=3)
    x = parse_numbers(pa.array(["1", "", "x"]), "I1", issues)   # [1.0, nan, nan]
    issues.bad_mask()                                            # [False, False, True]
    dense_transform("clamp_log1p", x)                            # [0.693, 0.0, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# The decimal forms Arrow's string->float cast accepts; used only to locate the culprits
# after a cast of the whole column failed.
_NUMBER_PATTERN = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"

DENSE_TRANSFORMS = {
    # DLRM's rule for Criteo: negative counts (I2 holds -1..-3) are clamped to 0 before log(x+1).
    "clamp_log1p": lambda x: np.log1p(np.maximum(x, 0.0)),
    # For arbitrary numeric columns: log(|x|+1) keeping the sign, so negatives stay distinct.
    "signed_log1p": lambda x: np.sign(x) * np.log1p(np.abs(x)),
    "identity": lambda x: x,
}


@dataclass
class Flag:
    """Rows of a chunk that one check rejected, with the column values to quote in messages."""

    reason: str
    field: str
    mask: np.ndarray
    values: pa.Array | None = None


@dataclass
class Issues:
    """The bad rows a transform found in one chunk, by reason.

    Checks run in a fixed order per format and a row is reported under the first reason
    flagged for it, so every bad row is counted exactly once.
    """

    rows: int
    flags: list[Flag] = field(default_factory=list)

    def flag(
        self, reason: str, field: str, mask: np.ndarray, values: pa.Array | None = None
    ) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            self.flags.append(Flag(reason, field, mask, values))

    def bad_mask(self) -> np.ndarray:
        bad = np.zeros(self.rows, dtype=bool)
        for f in self.flags:
            bad |= f.mask
        return bad

    def first_reasons(self) -> list[Flag]:
        """The flags with each row kept only under the first reason that flagged it."""
        taken = np.zeros(self.rows, dtype=bool)
        out = []
        for f in self.flags:
            own = f.mask & ~taken
            taken |= own
            if own.any():
                out.append(Flag(f.reason, f.field, own, f.values))
        return out


@dataclass
class Features:
    """One chunk after a format's transform, before vocabulary lookup.

    ``tokens`` holds raw categorical values as strings (null = missing) or, for multi-hot
    fields, lists of strings. ``source_rows[i]`` is the input row output row ``i`` came from,
    when a format expands rows (KDD Cup 2012 impressions); ``None`` means one output per input.
    ``numbers`` holds the parsed raw values (float64, NaN = missing) of numeric columns that a
    format fits on the train split (quantile buckets), before any dense transform.
    """

    label: np.ndarray | None
    dense: dict[str, np.ndarray]
    tokens: dict[str, pa.Array]
    source_rows: np.ndarray | None = None
    numbers: dict[str, np.ndarray] = field(default_factory=dict)


def as_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array (table columns come chunked)."""
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def as_strings(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one string array; numbers (from parquet or JSON records) are formatted and
    empty strings are missing, as empty fields of a text file are."""
    col = as_array(col)
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return _blank_is_null(col.cast(pa.string()))
    if pa.types.is_floating(t):
        # 3.0 read from parquet is the same category as "3" typed in a CSV.
        whole = pc.and_(pc.equal(col, pc.floor(col)), pc.less(pc.abs(col), 2.0**53))
        as_int = pc.if_else(whole, col, pa.nulls(len(col), col.type))
        ints = pc.cast(as_int, pa.int64(), safe=False).cast(pa.string())
        return pc.coalesce(ints, col.cast(pa.string()))
    return col.cast(pa.string())


def parse_numbers(
    col: pa.Array, field: str, issues: Issues, reason: str = "bad_number"
) -> np.ndarray:
    """Float64 values of a column; missing values and values flagged as bad are NaN.

    Empty strings are missing (the readers turn them into nulls), and so is NaN, which
    pandas and parquet use for missing numbers; infinities and unparsable text are bad.
    """
    col = as_array(col)
    if (
        pa.types.is_integer(col.type)
        or pa.types.is_floating(col.type)
        or pa.types.is_boolean(col.type)
    ):
        numbers = col.cast(pa.float64())
    else:
        col = as_strings(col)
        try:
            numbers = pc.cast(col, pa.float64())
        except pa.ArrowInvalid:  # locate the culprits; only chunks with bad values pay this
            matches = pc.match_substring_regex(col, _NUMBER_PATTERN)
            unparsable = pc.and_(col.is_valid(), pc.invert(matches)).to_numpy(zero_copy_only=False)
            issues.flag(reason, field, unparsable, col)
            numbers = pc.cast(
                pc.if_else(matches, col, pa.nulls(len(col), pa.string())), pa.float64()
            )
    x = numbers.to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
    infinite = np.isinf(x)
    issues.flag(reason, field, infinite, col)
    x[infinite] = np.nan
    return x


def _blank_is_null(col: pa.Array) -> pa.Array:
    blank = pc.equal(col, "")
    if not pc.any(blank).as_py():
        return col
    return pc.if_else(blank, pa.nulls(len(col), pa.string()), col)


def parse_binary_label(col: pa.Array, field: str, issues: Issues) -> np.ndarray:
    """A 0/1 click label; anything else (missing included) is flagged ``bad_label``."""
    y = parse_numbers(col, field, issues, reason="bad_label")
    issues.flag("bad_label", field, ~np.isin(y, (0.0, 1.0)), col)
    return np.nan_to_num(y).astype(np.float32)


def parse_unit_label(col: pa.Array, field: str, issues: Issues) -> np.ndarray:
    """A label in [0, 1] (click or soft label); missing or out of range is ``bad_label``."""
    y = parse_numbers(col, field, issues, reason="bad_label")
    with np.errstate(invalid="ignore"):
        issues.flag("bad_label", field, ~((y >= 0.0) & (y <= 1.0)), col)
    return np.nan_to_num(y).astype(np.float32)


def parse_named_label(
    col: pa.Array,
    field: str,
    positive: tuple[str, ...],
    negative: tuple[str, ...],
    issues: Issues,
) -> np.ndarray:
    """A label given as text (``>50K`` / ``<=50K``): 1 for ``positive`` values, 0 for
    ``negative`` ones; anything else, missing included, is flagged ``bad_label``."""
    col = as_strings(col)
    y = pc.is_in(col, value_set=pa.array(positive, pa.string())).to_numpy(zero_copy_only=False)
    known = pc.is_in(col, value_set=pa.array([*positive, *negative], pa.string()))
    issues.flag("bad_label", field, ~known.to_numpy(zero_copy_only=False), col)
    return y.astype(np.float32)


def trim_spaces(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Text values without surrounding whitespace (UCI files write ``39, State-gov``);
    other types pass unchanged."""
    col = as_array(col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.utf8_trim_whitespace(col)
    return col


def dense_transform(kind: str, x: np.ndarray) -> np.ndarray:
    """Applies a named transform from ``DENSE_TRANSFORMS``; missing (NaN) becomes 0."""
    if kind not in DENSE_TRANSFORMS:
        raise ValueError(f"unknown dense transform {kind!r}; known: {sorted(DENSE_TRANSFORMS)}")
    return np.nan_to_num(DENSE_TRANSFORMS[kind](x), nan=0.0).astype(np.float32)


def log_square_buckets(x: np.ndarray) -> pa.Array:
    """Criteo's standard bucketization as string tokens: ``floor(log(x)^2)`` for x > 2, else
    ``int(x)`` (so x = 1 and x = 3 share token "1", as in the reference protocols);
    missing stays null."""
    missing = np.isnan(x)
    safe = np.where(missing | (x <= 2), 3.0, x)
    buckets = np.where(x > 2, np.floor(np.log(safe) ** 2), np.trunc(np.nan_to_num(x)))
    return pa.array(buckets.astype(np.int64), mask=missing).cast(pa.string())


def token_lists(col: pa.Array, separator: str | None) -> pa.ListArray:
    """A multi-valued column as lists of non-empty string tokens (missing = empty list).

    Accepts lists (parquet, JSON records) or strings joined by ``separator``.
    """
    col = as_array(col)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lists = col.cast(pa.list_(pa.string()))
    else:
        if separator is None:
            raise ValueError("a multi-valued column given as strings needs a separator")
        lists = pc.split_pattern(as_strings(col), separator)
    parents = pc.list_parent_indices(lists).to_numpy()
    values = lists.flatten()
    keep = pc.and_kleene(values.is_valid(), pc.not_equal(values, "")).fill_null(False)
    lengths = np.bincount(parents[keep.to_numpy(zero_copy_only=False)], minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(keep))
