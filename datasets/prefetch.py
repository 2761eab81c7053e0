"""Items of an iterator produced ahead on a background thread (bounded, exceptions forwarded).

Used where the producer's work releases the GIL (pyarrow's parser and zlib while preparing raw
files; parquet decoding and numpy gathers while assembling batches), so on two cores the
producer overlaps the consumer.

Example::

    for batch in prefetched(loader_batches, depth=2, name="batch-prefetch"):
        train_step(batch)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetched(items: Iterator[T], depth: int = 2, name: str = "prefetch") -> Iterator[T]:
    """``items`` produced by a background thread, at most ``depth`` ahead of the consumer.

    Exceptions in the producer are re-raised in the consumer; closing the generator early
    (a ``break``) stops the producer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full buffer
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
