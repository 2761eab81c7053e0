"""Progress that suits where it goes: a live bar on a terminal, a few lines in a log.

tqdm redraws its bar with ``\\r`` every 0.1 s; piped into a log file that is thousands of
lines of noise. On a terminal :func:`progress_bar` is tqdm; anywhere else it writes one line
when a bar starts, one per tenth of the way (and at least one a minute), and one when it
ends. With progress turned off (``--no-progress``) it can still write the start
and end of each stage, or each update of a slow loop (a search generation), so a long quiet
run is never silent.

Example::

    with progress_bar(1000, "train", unit="steps", show=True) as bar:
        for _ in range(1000):
            bar.update(1)
"""

from __future__ import annotations

import sys
import time
from typing import Any, Literal, TextIO

from tqdm import tqdm

Quiet = Literal["none", "ends", "each"]


def progress_bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    show: bool = True,
    initial: int = 0,
    quiet: Quiet = "none",
    stream: TextIO | None = None,
    **tqdm_options: Any,
) -> Any:
    """tqdm on a terminal when ``show``; otherwise a :class:`LogProgress` writing lines:
    milestones when ``show`` (a log), else as ``quiet`` says: nothing, the start and end
    (``"ends"``), or every update (``"each"``: for loops of few, slow iterations)."""
    stream = stream or sys.stderr
    if show and _is_tty(stream):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, **tqdm_options)
    mode = "milestones" if show else quiet
    return LogProgress(total, desc, unit, initial, mode, stream)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LogProgress:
    """tqdm's interface (update, set_postfix, close, a context manager), written as lines."""

    MIN_SECONDS = 60.0

    def __init__(
        self, total: int | None, desc: str, unit: str, initial: int, mode: str, stream: TextIO
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.mode, self.stream = mode, stream
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.next_tenth = self._tenth(initial) + 1
        self.closed = False
        if mode != "none":
            of = f"/{total:,}" if total is not None else ""
            self._line(f"{initial:,}{of} {unit}" + (" (resumed)" if initial else ""))

    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.mode == "each":
            self._line(self._where())
        elif self.mode == "milestones":
            now = time.monotonic()
            if (
                self._tenth(self.n) >= self.next_tenth
                and now - self.last >= 1.0
                or (now - self.last >= self.MIN_SECONDS)
            ):
                self.next_tenth = self._tenth(self.n) + 1
                self._line(self._where())

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **values: Any) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.mode != "none":
            elapsed = time.monotonic() - self.started
            self._line(f"{self._where()} in {elapsed:.0f}s")

    def _where(self) -> str:
        of = f"/{self.total:,}" if self.total is not None else ""
        return f"{self.n:,}{of} {self.unit}" + (f" ({self.postfix})" if self.postfix else "")

    def _line(self, text: str) -> None:
        self.last = time.monotonic()
        print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
