"""Weights that pass through a file instead of a second copy in memory.

Replacing a table by another (fusing it into fbgemm's kernel) or restoring saved weights
would otherwise hold two whole copies at once: at millions of ids, twice what the method
needs. :func:`spilled` writes tensors to a private temporary file and frees them, then hands
them back mapped from it; :func:`release_mapped` drops a mapped file's pages from this
process once they have been copied (``MADV_DONTNEED`` on Linux: clean private pages refault
from the file if read again; nothing elsewhere).

Example::

    with spilled(old_weights) as mapped:      # old_weights' memory is freed here
        new = build_the_replacement()
        for name, w in mapped():              # one tensor resident at a time
            new[name].copy_(w)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

_MADV_DONTNEED = 4  # Linux


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """This process's private mappings of ``path`` as (address, length); none off Linux."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:
            lines = [line.split() for line in f]
    except OSError:
        return []
    target = str(Path(path).resolve())
    ranges = []
    for parts in lines:
        if len(parts) >= 6 and " ".join(parts[5:]) == target and parts[1].endswith("p"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end - start))
    return ranges


def release_mapped(ranges: list[tuple[int, int]]) -> None:
    """Drops the resident pages of ``ranges`` (private, read-only use) from this process."""
    if not ranges:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, length in ranges:
        libc.madvise(start, length, _MADV_DONTNEED)


CHUNK_BYTES = 64 << 20  # rows copied from a mapping at a time by Mapped.copy_into


class Mapped:
    """Spilled tensors handed back: iterate (``mapped()``) or copy into same-shaped targets
    a chunk of rows at a time (:meth:`copy_into`), the file's pages dropped as they go."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], ranges: list[tuple[int, int]]) -> None:
        self.tensors = tensors
        self.ranges = ranges

    def __call__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, value in self.tensors.items():
            yield name, value
            release_mapped(self.ranges)

    def copy_into(
        self, targets: Mapping[str, torch.Tensor], chunk_bytes: int | None = None
    ) -> None:
        """Copies every tensor into ``targets[name]``; from a file, ``chunk_bytes`` of rows
        at a time with its pages dropped after each chunk, so one table held as a single
        tensor is never resident whole from the file beside its copy."""
        with torch.no_grad():
            for name, src in self.tensors.items():
                copy_rows(targets[name], src, self.ranges, chunk_bytes)


def copy_rows(
    dst: torch.Tensor,
    src: torch.Tensor,
    ranges: list[tuple[int, int]],
    chunk_bytes: int | None = None,
) -> None:
    """``src`` copied into the same-shaped ``dst``; where ``src`` is mapped from a file
    (``ranges``, its mappings), ``chunk_bytes`` (:data:`CHUNK_BYTES`) of rows at a time with
    the file's pages dropped after each chunk, so a table held as one tensor is never
    resident whole from the file beside its copy."""
    if not ranges or src.dim() == 0 or src.shape[0] == 0:
        dst.copy_(src)
        return
    step = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, src[0].numel() * src.element_size()))
    for i in range(0, src.shape[0], step):
        dst[i : i + step].copy_(src[i : i + step])
        release_mapped(ranges)


@contextmanager
def spilled(
    tensors: Mapping[str, torch.Tensor],
) -> Iterator[Mapped]:
    """Writes host ``tensors`` to a private temporary file and frees their storage (the
    caller is replacing them: they are empty afterwards); yields a function iterating over
    them mapped from the file, each one's pages let go once the next is asked for. The file
    is removed on exit (:class:`Mapped` also copies them into their replacements a chunk of
    rows at a time). Tensors off the host, or sharing storage, are handed back as they are
    (nothing to gain, or not safe to free)."""
    storages = [t.untyped_storage() for t in tensors.values()]
    host = all(t.device.type == "cpu" for t in tensors.values())
    distinct = len({s.data_ptr() for s in storages}) == len(storages)
    if not tensors or not host or not distinct or not all(s.resizable() for s in storages):
        yield Mapped(tensors, [])
        return
    folder = Path(tempfile.mkdtemp(prefix="ctr-spill-"))
    try:
        path = folder / "weights.pt"
        torch.save(dict(tensors), path)  # written from the tensors' own memory
        for storage in storages:
            storage.resize_(0)
        yield Mapped(torch.load(path, weights_only=True, mmap=True), mapped_ranges(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
