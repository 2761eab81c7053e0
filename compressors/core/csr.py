"""Compressed sparse rows, as the pruning and dimension-search exports store and serve them.

A CSR of ``rows`` rows of width ``dim`` holds, per non-zero entry, its value and its column
(uint8, or int16 when ``dim > 256``), and per row where its entries start. The row pointers
are stored as an int32 **base** per 64 rows plus a 16-bit unsigned **offset** per row (row
``j`` starts at ``base[j // 64] + offset[j]``): 2.06 bytes a row instead of an int32's 4,
which matters because a table pruned to 10x of a 16-dim fp32 table would otherwise spend 62%
of its budget on pointers. The offsets are held as int16 (torch cannot index uint16) and read
back ``& 0xFFFF``. When 63 rows of ``dim`` entries could overflow 16 bits (``dim > 1040``) the
pointers stay int32 (``ptr``), as do exports written before the split form (both serve).

Serving holds exactly the stored tensors (no widened copies: ``resident`` = ``serve_bytes``)
and converts per lookup.

Example::

    structure, data = pack_entries(keep, values)      # {"cols", "base", "offsets"}, fp32
    tensors = pack_pointers(ptr, dim)                 # {"base", "offsets"} or {"ptr"}
    start, count = row_span(tensors, rows)            # where rows' entries are, how many
    pooled = pool_entries(rows, lengths, tensors, cols, values, dim)   # [B, dim]
"""

from __future__ import annotations

import torch

PTR_BYTES = 4
POINTER_BLOCK = 64  # rows per int32 pointer base
UINT16_MAX = 65535
POINTER_KEYS = ("base", "offsets", "ptr")


def column_bytes(dim: int) -> int:
    return 1 if dim <= 256 else 2


def column_dtype(dim: int) -> torch.dtype:
    return torch.uint8 if dim <= 256 else torch.int16


def compact_pointers(dim: int) -> bool:
    """Whether a CSR of width ``dim`` splits its row pointers into bases + 16-bit offsets (an
    offset spans at most 63 rows of ``dim`` entries)."""
    return (POINTER_BLOCK - 1) * dim <= UINT16_MAX


def pointer_bytes(rows: int, dim: int) -> int:
    """Bytes of the ``rows + 1`` row pointers of a CSR of width ``dim``."""
    if compact_pointers(dim):
        return (rows + 1) * 2 + -(-(rows + 1) // POINTER_BLOCK) * PTR_BYTES
    return (rows + 1) * PTR_BYTES


def row_pointers(counts: torch.Tensor) -> torch.Tensor:
    """``[rows + 1]`` int64 start of each row's entries (and the end), from entries per row."""
    ptr = torch.zeros(len(counts) + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr


def pack_pointers(ptr: torch.Tensor, dim: int) -> dict[str, torch.Tensor]:
    """``ptr`` (int64, ``rows + 1``) in its stored form: ``base`` + ``offsets``, or ``ptr``."""
    if not compact_pointers(dim):
        return {"ptr": ptr.to(torch.int32)}
    base = ptr[::POINTER_BLOCK]
    offsets = ptr - base.repeat_interleave(POINTER_BLOCK)[: len(ptr)]
    return {"base": base.to(torch.int32), "offsets": offsets.to(torch.int32).to(torch.int16)}


def pack_entries(
    keep: torch.Tensor, values: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The entries ``keep`` marks (bool ``[rows, dim]``) as CSR: ``cols`` and the stored row
    pointers, and their ``values`` (fp32, row by row) for the caller to store at its dtype."""
    rows, cols = keep.nonzero(as_tuple=True)
    structure = {"cols": cols.to(column_dtype(keep.shape[1]))}
    structure.update(pack_pointers(row_pointers(keep.sum(1)), keep.shape[1]))
    return structure, values[rows, cols].float()


def pointer_at(pointers: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Where rows ``rows`` start (``rows`` may be the row count: the end), int64."""
    if "ptr" in pointers:
        return pointers["ptr"][rows].long()
    base = pointers["base"][rows // POINTER_BLOCK].long()
    return base + (pointers["offsets"][rows].long() & UINT16_MAX)


def row_span(
    pointers: dict[str, torch.Tensor], rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and entry count of each row in ``rows``."""
    start = pointer_at(pointers, rows)
    return start, pointer_at(pointers, rows + 1) - start


def pool_entries(
    rows: torch.Tensor,
    lengths: torch.Tensor,
    pointers: dict[str, torch.Tensor],
    cols: torch.Tensor,
    values: torch.Tensor,
    dim: int,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Sum-pooled bags ``[B, dim]`` (fp32) of CSR rows ``rows`` (``lengths`` rows a bag);
    ``values`` at any stored dtype, times ``scale`` (int8 codes)."""
    batch = len(lengths)
    out = torch.zeros(batch * dim)
    if rows.numel() == 0:
        return out.view(batch, dim)
    start, count = row_span(pointers, rows.long())
    total = int(count.sum())
    if total:
        first = torch.cumsum(count, 0) - count
        owner = torch.repeat_interleave(torch.arange(len(rows)), count)
        entry = torch.arange(total) - first[owner] + start[owner]
        bag = torch.repeat_interleave(torch.arange(batch), lengths)[owner]
        vals = values[entry].float() * scale
        out.index_add_(0, bag * dim + cols[entry].long(), vals)
    return out.view(batch, dim)
