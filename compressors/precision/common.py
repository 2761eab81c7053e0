"""Shared tools of the precision family: row codes in fbgemm's format, stochastic rounding,
frequency-weighted reconstruction error, and mixed precision per table.

fbgemm's int-N inference row is ``[scale fp16 | bias fp16 | codes]`` with unsigned codes
packed low bits first, a value being ``code * scale + bias``. Methods that train integer
codes themselves (``int8``, ``alpt``) turn their signed codes ``q`` with step ``s`` into that
row exactly: ``code = q + 2^(bits-1)``, ``scale = s``, ``bias = -2^(bits-1) * s`` (exact in
fp16 whenever ``s`` is).

Mixed precision is a multiple-choice knapsack: every table picks one dtype from
{fp32, fp16, int8, int4, int2}, costing its serve bytes and its frequency-weighted error
``Σ_v freq_v · ||e_v − Q(e_v)||²``; the total error is minimised under the budget.
:func:`choose_dtypes` solves it by dynamic programming over the budget (see there). It works on
any :class:`~compressors.core.tables.TableMethod` (per-field, hashed, shared or QR tables alike):
:func:`row_frequencies` pushes each field's id counts through the method's own index map.

Example::

    dtypes = solve_mixed_precision(method, budget_bytes=method.budget_bytes)
    apply_table_dtypes(method, dtypes)   # memory()/export() now use them
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.storage import BITS, SCALE_BIAS_BYTES, pack_rows, row_bytes, unpack_rows
from compressors.core.tables import TableMethod

# From most to least precise; every table method can serve any of these.
DTYPES = ("fp32", "fp16", "int8", "int4", "int2")
_CHUNK_ROWS = 1 << 16  # bounds the temporary memory of table-wide passes (~4 MiB a float
# temporary at dim 16; at 1M rows a pass held ~200 MiB of them)
PACK_CHUNK_ROWS = 1 << 16  # rows packed at a time (int32 temporaries of a few MB)
# Ids mapped at a time by row_frequencies: its lengths are int64 for every field (26 x 8
# bytes per id on Criteo), 13 MiB at this size against 208 MiB at 1M ids.
MAP_CHUNK_ROWS = 1 << 16


def valid_dtypes(dim: int, candidates: Sequence[str] = DTYPES) -> list[str]:
    """The dtypes of ``candidates`` whose packed rows fit whole bytes at ``dim``."""
    return [d for d in candidates if (dim * BITS[d]) % 8 == 0]


# ---------------------------------------------------------------- integer codes
def stochastic_round(x: torch.Tensor) -> torch.Tensor:
    """Rounds up with probability ``frac(x)``: unbiased, so updates smaller than one step
    survive in expectation (uses torch's global RNG, which checkpoints save)."""
    return torch.floor(x + torch.rand_like(x))


def signed_range(bits: int) -> tuple[int, int]:
    """The signed code range of ``bits``: ``[-2^(bits-1), 2^(bits-1) - 1]``."""
    half = 1 << (bits - 1)
    return -half, half - 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[n, d]`` (< 2^bits) -> bytes ``[n, d*bits/8]``, low bits first."""
    per_byte = 8 // bits
    n, d = codes.shape
    if (d * bits) % 8:
        raise ValueError(f"{d} codes of {bits} bits do not fill whole bytes")
    grouped = codes.to(torch.int32).view(n, d // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: bytes ``[n, m]`` -> unsigned codes ``[n, m*8/bits]``."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(1).to(torch.uint8)


def fbgemm_rows(codes: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[n, d]`` with per-row steps ``[n]`` -> fbgemm int-N rows (uint8).

    ``step`` is stored as fp16; values are exact when it is fp16-representable.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"fbgemm serves 2, 4 or 8-bit codes, not {bits}")
    lo, _ = signed_range(bits)
    n, d = codes.shape
    out = torch.empty(n, SCALE_BIAS_BYTES + d * bits // 8, dtype=torch.uint8)
    # In row chunks: whole-table int32 temporaries would be 4-8x the packed table.
    for start in range(0, n, PACK_CHUNK_ROWS):
        end = min(n, start + PACK_CHUNK_ROWS)
        step16 = step[start:end].to(torch.float16).reshape(-1, 1)
        out[start:end, :SCALE_BIAS_BYTES] = torch.cat([step16, step16 * lo], 1).view(torch.uint8)
        out[start:end, SCALE_BIAS_BYTES:] = pack_codes(codes[start:end].to(torch.int32) - lo, bits)
    return out


def fbgemm_scale_bias(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row fp32 (scale, bias) of fbgemm int-N rows."""
    head = packed[:, :SCALE_BIAS_BYTES].contiguous().view(torch.float16).float()
    return head[:, 0], head[:, 1]


# ---------------------------------------------------------------- reconstruction error
def row_errors(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """``||e_v − Q(e_v)||²`` per row, through the exact packing an artifact stores."""
    out = torch.empty(weight.shape[0], device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        w = weight[start : start + _CHUNK_ROWS].detach().float()
        if dtype == "fp32":
            out[start : start + len(w)] = 0.0
        else:
            out[start : start + len(w)] = (
                (unpack_rows(pack_rows(w, dtype), dtype) - w).pow(2).sum(1)
            )
    return out


def fake_quantize_(weight: torch.Tensor, dtype: str) -> None:
    """Rounds ``weight`` in place to the values the served ``dtype`` rows hold, a chunk of
    rows at a time (an out-of-place copy would hold a second whole table, twice over in
    its chunks and their concatenation)."""
    if dtype == "fp32":
        return
    with torch.no_grad():
        for s in range(0, weight.shape[0], _CHUNK_ROWS):
            chunk = weight[s : s + _CHUNK_ROWS]
            chunk.copy_(unpack_rows(pack_rows(chunk, dtype), dtype))


def weighted_error(weight: torch.Tensor, dtype: str, freq: torch.Tensor) -> float:
    """``Σ_v freq_v · ||e_v − Q(e_v)||²`` in float64, a chunk of rows at a time (no per-row
    error array, nor its float64 copy, over the whole table)."""
    if dtype == "fp32":
        return 0.0
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for s in range(0, weight.shape[0], _CHUNK_ROWS):
        w = weight[s : s + _CHUNK_ROWS].detach().float()
        err = (unpack_rows(pack_rows(w, dtype), dtype) - w).pow(2).sum(1)
        total += (err.double() * freq[s : s + len(w)]).sum()
    return float(total)


# ---------------------------------------------------------------- mixed precision
def choose_dtypes(
    costs: Sequence[Mapping[str, int]],
    errors: Sequence[Mapping[str, float]],
    budget_bytes: int,
    fixed_bytes: int = 0,
    resolution: int = 20_000,
) -> list[str]:
    """Multiple-choice knapsack: one dtype per item minimising Σ error under the budget.

    Solved by dynamic programming over the budget, counted in ``ceil(budget / resolution)``
    byte units with every cost rounded *up* (so the choice always fits; it is exact when the
    budget is below ``resolution`` bytes, and otherwise loses at most one unit per item).
    A greedy by error reduction per byte is the textbook shortcut but fails on lumpy items:
    with tables of very different sizes it spends the budget on cheap upgrades of small
    tables and cannot afford the big one's (on trained DeepFM tables it ended about twice as
    wrong as uniform int4 at equal bytes). Ties go to the cheaper option.
    """
    if len(costs) != len(errors):
        raise ValueError("one cost table and one error table per item")
    cheapest = [min(c, key=lambda d, c=c: (c[d], errors[i][d])) for i, c in enumerate(costs)]
    floor = fixed_bytes + sum(c[d] for c, d in zip(costs, cheapest, strict=True))
    if floor > budget_bytes:
        raise BudgetError(
            f"even the cheapest precision needs {describe_bytes(floor)}, "
            f"more than the budget of {describe_bytes(budget_bytes)}"
        )
    capacity = budget_bytes - fixed_bytes
    unit = max(1, math.ceil(capacity / resolution))
    slots = capacity // unit
    # best[k]: least error of the items so far within k units; picks[i][k]: item i's option.
    best = np.zeros(slots + 1)
    picks = []
    for cost, err in zip(costs, errors, strict=True):
        options = sorted(cost, key=lambda d, cost=cost: cost[d])
        new = np.full(slots + 1, np.inf)
        pick = np.full(slots + 1, -1, dtype=np.int64)
        for j, d in enumerate(options):
            units = math.ceil(cost[d] / unit)
            if units > slots:
                continue
            candidate = np.full(slots + 1, np.inf)
            candidate[units:] = best[: slots + 1 - units] + err[d]
            better = candidate < new
            new[better], pick[better] = candidate[better], j
        best = new
        picks.append((options, pick))
    if not np.isfinite(best[slots]):
        return cheapest  # only the rounding of costs made the exact floor look infeasible
    choice, k = [], slots
    for (options, pick), cost in zip(reversed(picks), reversed(costs), strict=True):
        d = options[pick[k]]
        choice.append(d)
        k -= math.ceil(cost[d] / unit)
    return choice[::-1]


def row_frequencies(method: TableMethod) -> dict[str, torch.Tensor]:
    """Per physical row, the summed train counts of the values that read it.

    Every field's ids go through the method's own index map, so this holds for per-field,
    shared, hashed or QR tables alike (a row read by several lookups of one value counts it
    once per lookup). Fields without frequencies count each value once (uniform).
    """
    layout = method.layout
    # The index map runs where the method's tables (and its own buffers) are.
    on = {"device": next(iter(method.tables.weights().values())).device}
    acc = {t.name: torch.zeros(t.rows, dtype=torch.float64, **on) for t in layout.tables}
    names = method.feature_names
    for fi, spec in enumerate(method.features):
        mine = [lk for lk in layout.lookups if lk.field == fi]
        for start in range(0, spec.cardinality, MAP_CHUNK_ROWS):
            end = min(start + MAP_CHUNK_ROWS, spec.cardinality)
            ids = torch.arange(start, end, **on)
            # A chunk of the counts at a time: a float64 copy of a field's counts would be
            # 8 bytes per id beside the (mapped) counts themselves.
            counts = (
                torch.ones(len(ids), dtype=torch.float64, **on)
                if spec.frequencies is None
                else torch.as_tensor(spec.frequencies[start:end], dtype=torch.float64, **on)
            )
            lengths = torch.zeros(len(names), len(ids), dtype=torch.int64, **on)
            lengths[fi] = 1
            kjt = KeyedJaggedTensor(
                keys=names, values=ids, lengths=lengths.flatten(), stride=len(ids)
            )
            with torch.no_grad():
                rows = method.index_map(kjt)
            for lk in mine:
                jt = rows[lk.key]
                acc[lk.table].index_add_(
                    0, jt.values(), torch.repeat_interleave(counts, jt.lengths())
                )
    return acc


def solve_mixed_precision(
    method: TableMethod,
    budget_bytes: int,
    candidates: Sequence[Sequence[str]] | None = None,
) -> list[str]:
    """Per table of ``method``, the dtype minimising total frequency-weighted error in budget.

    Errors are measured on the method's current (trained) weights through fbgemm's packing;
    index-map tensors count as fixed bytes. ``candidates`` restricts each table's choices
    (default: every dtype valid at its dim).
    """
    layout = method.layout
    weights = method.tables.weights()
    freqs = row_frequencies(method)
    costs, errors = [], []
    for i, t in enumerate(layout.tables):
        options = valid_dtypes(t.dim, candidates[i] if candidates is not None else DTYPES)
        costs.append({d: t.rows * row_bytes(t.dim, d) for d in options})
        w = freqs[t.name]
        errors.append({d: weighted_error(weights[t.name], d, w) for d in options})
    fixed = layout.serve_bytes() - sum(t.serve_bytes for t in layout.tables)
    try:
        return choose_dtypes(costs, errors, budget_bytes, fixed)
    except BudgetError as e:
        raise BudgetError(f"{method.name}: mixed precision: {e}") from None


def apply_table_dtypes(
    method: TableMethod, dtypes: Sequence[str], round_weights: bool = True
) -> None:
    """Sets each table's serving dtype; with ``round_weights`` the trained fp32 weights are
    replaced by the values those dtypes serve, so the trained model predicts exactly what
    its artifact will."""
    layout = method.layout
    if len(dtypes) != len(layout.tables):
        raise ValueError(f"{len(dtypes)} dtypes for {len(layout.tables)} tables")
    layout.tables = [replace(t, dtype=d) for t, d in zip(layout.tables, dtypes, strict=True)]
    if round_weights:
        weights = method.tables.weights()
        with torch.no_grad():
            for t in layout.tables:
                fake_quantize_(weights[t.name], t.dtype)
