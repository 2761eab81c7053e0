"""Files and output directories of every command: write atomically, hash, never clobber.

Files: :func:`atomic_write` (its ``_text``/``_bytes`` forms, and :func:`atomic_path` for a
file written over many calls) writes beside the target and renames, so a reader sees the old
file or the new one, never half of one; :func:`file_sha256` hashes in blocks.
Every command's writes go through here.

Directories:

A command that writes a directory (``ctr synth``, ``ctr export``, ``ctr demo``) builds it in a
hidden staging directory beside the target and renames it into place only once complete, so
a reader never sees half an output and a failure leaves the previous one intact. The target
may be absent or empty; if it holds files, they must be a previous output *of the same kind*
(recognised by ``is_ours``) and the user must pass ``--overwrite``. Anything else is refused
and left untouched, and so is the current directory or any directory above it.

Example::

    with replace_dir("artifacts/deepfm", "artifact", is_artifact, overwrite=False) as staging:
        write_everything_into(staging)
    # artifacts/deepfm now holds what was written; a previous artifact there is gone
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Calls ``write(tmp)`` on a hidden file beside ``path``, then renames it to ``path``.

    The temporary name is unique per call, so concurrent writers never share one; on any
    error it is removed and ``path`` is left as it was. Returns ``path``.
    """
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_write` as a context: yields the hidden temporary path beside ``path``,
    renamed to ``path`` when the block ends (removed if it raises). For a file written over
    many calls, e.g. a parquet shard streamed row group by row group."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (artifacts can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class OutputExistsError(ValueError):
    """The output path holds something we may not (or were not asked to) replace."""


def check_output_dir(
    path: str | os.PathLike, kind: str, is_ours: Callable[[Path], bool], overwrite: bool
) -> Path:
    """Refuses ``path`` unless it is absent, empty, or our own ``kind`` output and ``overwrite``.

    Returns the absolute path. Call it before any expensive work, so a refusal comes first.
    """
    path = refuse_current_dir(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a directory; choose another --out")
    if not any(path.iterdir()):
        return path
    if not is_ours(path):
        raise OutputExistsError(
            f"{path}: not empty and not a {kind} (holds {_listing(path)}); "
            "nothing was changed; choose another --out"
        )
    if not overwrite:
        raise OutputExistsError(f"{path}: holds a {kind}; pass --overwrite to replace it")
    return path


def refuse_current_dir(path: str | os.PathLike) -> Path:
    """The absolute ``path``; refuses the current directory or one above it (an output there
    would mix with, or replace, everything the user is working on)."""
    path = Path(path).absolute()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputExistsError(
            f"{path}: is the current directory or one above it; choose a new directory for --out"
        )
    return path


@contextmanager
def replace_dir(
    path: str | os.PathLike,
    kind: str,
    is_ours: Callable[[Path], bool],
    overwrite: bool = False,
    in_place: bool = False,
) -> Iterator[Path]:
    """Yields an empty staging directory beside ``path``; on success it becomes ``path``.

    The check runs again just before the rename (the target may have changed meanwhile); a
    replaced output is renamed aside first and deleted only after the new one is in place.
    On any error the staging directory is removed and ``path`` is left as it was.

    ``in_place=True`` (for outputs whose files record their own absolute paths) moves a
    previous output aside and yields ``path`` itself; a failure removes the partial output
    and moves the previous one back.
    """
    path = check_output_dir(path, kind, is_ours, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if in_place:
        yield from _in_place(path)
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    try:
        yield staging
        check_output_dir(path, kind, is_ours, overwrite)
        old = _move_aside(path)
        try:
            os.replace(staging, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _in_place(path: Path) -> Iterator[Path]:
    old = _move_aside(path)
    path.mkdir(exist_ok=True)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # we created it just above
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _move_aside(path: Path) -> Path | None:
    """Renames an existing ``path`` to a hidden sibling; returns it (None if absent)."""
    if not path.exists():
        return None
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old)  # ``old`` is an empty directory, so the rename replaces it
    return old


def only_names(path: Path, allowed: set[str]) -> bool:
    """Whether every entry of directory ``path`` is one of ``allowed`` (a format's own names)."""
    return all(p.name in allowed for p in path.iterdir())


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
