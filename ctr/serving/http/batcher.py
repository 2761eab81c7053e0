"""Micro-batching: requests queue, and one batcher coalesces them into model forwards.

A batch takes every request that queued while the previous forward ran (an idle model answers
a lone request at once) up to ``max_batch`` rows, and waits up to ``max_delay_ms`` since its
first request for more. A batch's raw values are encoded together (one vectorised pass over all
its requests' rows: the per-field fixed cost is paid once per batch) and its forward runs on a
dedicated thread (a small batch with nothing queued behind it: on the event loop, see
``Batcher.INLINE_ROWS``); a value that fails to encode fails only its own request. A full
queue (over ``max_queue_rows`` rows waiting) answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa

from ctr.serving.http.config import ServeConfig
from ctr.serving.http.metrics import Metrics
from ctr.serving.http.models import Served, forward
from ctr.serving.http.requests import RequestError, Rows, rows_to_columns
from datasets.encode import EncodedRecords

log = logging.getLogger("ctr.serve")


@dataclass
class RawColumns:
    """A request's validated raw values, encoded with the rest of its batch: columns, or
    rows (:class:`Rows`, made columns with the whole batch)."""

    columns: dict[str, list[Any]] | Rows
    rows: int

    def as_columns(self) -> dict[str, list[Any]]:
        return self.columns.columns() if isinstance(self.columns, Rows) else self.columns


@dataclass
class Pending:
    served: Served
    encoded: EncodedRecords | RawColumns
    rows: int
    future: asyncio.Future


def run_batch(
    served: Served, items: Sequence[EncodedRecords | RawColumns]
) -> tuple[np.ndarray, list[tuple[int, int] | RequestError]]:
    """Encodes the raw requests of a batch together (one vectorised pass over all their rows;
    request by request only when that fails, to blame the right one) and runs one forward.
    Returns the probabilities and, per item, its slice of them or its error."""
    raw = [i for i, it in enumerate(items) if isinstance(it, RawColumns)]
    parts: list[EncodedRecords] = []
    order: list[int] = []
    outcome: list[tuple[int, int] | RequestError | None] = [None] * len(items)
    if raw:
        try:
            parts.append(_encode_raw(served, _merge([items[i] for i in raw])))
            order += raw
        except RequestError:
            for i in raw:
                try:
                    parts.append(_encode_raw(served, items[i]))
                    order.append(i)
                except RequestError as e:
                    outcome[i] = e
    for i, it in enumerate(items):
        if isinstance(it, EncodedRecords):
            parts.append(it)
            order.append(i)
    probs = forward(served, parts) if parts else np.zeros(0, np.float32)
    start = 0
    for i in order:
        item = items[i]
        rows = item.rows if isinstance(item, RawColumns) else len(item.dense)
        outcome[i] = (start, start + rows)
        start += rows
    return probs, outcome  # type: ignore[return-value]


def _merge(items: Sequence[RawColumns]) -> RawColumns:
    if len(items) == 1:
        return items[0]
    rows = sum(it.rows for it in items)
    forms = [it.columns for it in items]
    if all(isinstance(f, Rows) for f in forms):  # the rows form: one pass a field
        records = list(chain.from_iterable([f.rows for f in forms]))  # type: ignore[union-attr]
        fields = set().union(*[f.fields for f in forms])  # type: ignore[union-attr]
        return RawColumns(rows_to_columns(records, fields), rows)
    items = [RawColumns(it.as_columns(), it.rows) for it in items]
    first = items[0].columns.keys()
    if all(it.columns.keys() == first for it in items):  # the usual case: the same fields
        return RawColumns(
            {k: list(chain.from_iterable([it.columns[k] for it in items])) for k in first}, rows
        )
    fields = dict.fromkeys(k for it in items for k in it.columns)
    columns = {
        k: list(chain.from_iterable([it.columns.get(k) or [None] * it.rows for it in items]))
        for k in fields
    }
    return RawColumns(columns, rows)


def _encode_raw(served: Served, raw: RawColumns) -> EncodedRecords:
    assert served.encoder is not None
    try:
        return served.encoder.encode_columns(raw.as_columns(), raw.rows)
    except (ValueError, OverflowError, TypeError, pa.ArrowException) as e:
        raise RequestError(400, str(e)) from e


class Batcher:
    """Coalesces queued requests into forwards of at most ``max_batch`` rows.

    A batch closes when it is full, when ``max_delay`` passed since its first request (and
    the previous forward is done), or when the next request was accepted by another model
    (after a swap); while one forward runs, the next batch fills. Only requests of the same
    model share a forward.
    """

    #: a batch of at most this many rows, with no request queued behind it, runs on the
    #: event loop (about a millisecond: a lone ranking call), larger ones on the forward thread
    INLINE_ROWS = 16

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.queued_rows = 0
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ctr-forward")
        self._carry: Pending | None = None
        self._slot = asyncio.Semaphore(1)
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, served: Served, encoded: EncodedRecords, rows: int) -> list[float]:
        return await self.enqueue(served, encoded, rows)

    def enqueue(
        self, served: Served, encoded: EncodedRecords | RawColumns, rows: int
    ) -> asyncio.Future:
        """Queues a request; its future gets the predictions (or the request's error). A full
        queue raises 503 at once."""
        if self.queued_rows + rows > self.config.max_queue_rows:
            raise RequestError(
                503,
                f"the queue is full ({self.queued_rows} rows waiting, limit "
                f"{self.config.max_queue_rows}); retry shortly",
                {"Retry-After": "1"},
            )
        future = asyncio.get_running_loop().create_future()
        self.queued_rows += rows
        self.queue.put_nowait(Pending(served, encoded, rows, future))
        return future

    async def _next(self, timeout: float | None) -> Pending | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self.queue.get()
        if timeout <= 0:
            return self.queue.get_nowait() if not self.queue.empty() else None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def _run(self) -> None:
        while True:
            try:
                await self._collect()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad batch stop the batcher (requests would hang)
                log.exception("batcher failed; continuing")

    async def _collect(self) -> None:
        """Takes one batch off the queue and starts its forward."""
        loop = asyncio.get_running_loop()
        first = await self._next(None)
        assert first is not None
        batch, rows = [first], first.rows
        deadline = loop.time() + self.config.max_delay_ms / 1000
        await self._slot.acquire()  # the previous forward is done; the queue filled meanwhile
        try:
            while rows < self.config.max_batch:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if item.served is not first.served or rows + item.rows > self.config.max_batch:
                    self._carry = item
                    break
                batch.append(item)
                rows += item.rows
        except BaseException as e:
            self._slot.release()
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            raise
        finally:
            self.queued_rows -= rows
        task = loop.create_task(self._forward(batch, rows))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _forward(self, batch: list[Pending], rows: int) -> None:
        try:
            served = batch[0].served
            items = [p.encoded for p in batch]
            if rows <= self.INLINE_ROWS and self.queue.empty():
                # Nothing else waits: a small batch is answered on the event loop, without
                # the two thread hand-offs (each a wake-up the scheduler may delay).
                probs, outcome = run_batch(served, items)
            else:
                probs, outcome = await asyncio.get_running_loop().run_in_executor(
                    self.executor, run_batch, served, items
                )
            self.metrics.batch_rows.observe(len(probs))
            for p, result in zip(batch, outcome, strict=True):
                if p.future.done():
                    continue
                if isinstance(result, RequestError):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(probs[result[0] : result[1]].tolist())
        except Exception as e:  # a failed forward fails its requests, never the batcher
            log.exception("forward failed")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        finally:
            self._slot.release()
