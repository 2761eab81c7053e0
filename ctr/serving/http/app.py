"""``ctr serve``: an artifact behind HTTP (Starlette under uvicorn), with micro-batching.

Endpoints:

- ``POST /v1/predict`` — ``{"instances": [{"C1": "68fd1e64", "I1": 3}, ...]}`` (rows) or
  ``{"inputs": {"C1": [...], "I1": [...]}}`` (columns) of raw values, as the dataset's files
  held them; ``"ids": true`` sends prepared ids (sparse) and transformed floats (dense)
  instead. Answers ``{"predictions": [p, ...]}`` (click probabilities, request order).
  *Missing fields*: a sparse field that is absent, null or ``""`` is the missing value, which
  preparation encoded as id 0 (OOV); a dense field that is absent or null is the missing
  number, which the dataset's transform fills (Criteo: ``log(1 + 0)``, tables: 0). With
  ``"ids": true`` an absent sparse field is id 0 and an absent dense field is 0.0; a field
  the model keys by raw-value fingerprint (metadata ``fingerprint_fields``) takes the value's
  64-bit fingerprint (:func:`datasets.fingerprint.fingerprint_strings`) as its id.
- ``GET /v1/metadata`` — model, method and solved hyperparameters, fields, serving footprint
  (tables and, for id-keyed methods, the vocabulary), dataset, artifact version and checksum.
- ``GET /healthz`` (the process answers) and ``GET /readyz`` (a verified model is loaded).
- ``GET /metrics`` — Prometheus text: requests by status, latency and batch-size histograms,
  rows predicted, queue depth, reloads.
- ``POST /v1/reload`` (or ``SIGHUP``) — load and verify the artifact again (for a directory of
  versions: the newest one) in the background and swap atomically; a directory of versions
  is also polled. Requests already queued finish on the model they were accepted by; an
  artifact that fails verification is refused (409) and the old model keeps serving.

Requests are validated on arrival, queued, and coalesced by one batcher into forwards of up
to ``max_batch`` rows: a batch takes every request that queued while the previous forward
ran (an idle model answers a lone request at once), and waits up to ``max_delay_ms`` since
its first request for more (default 0: no wait; raise it for fuller batches at low load).
A batch's raw values are encoded together (small batches from the encoder's memo of recent
values, larger ones in one vectorised pass over all its requests' rows: the per-field fixed
cost is paid once per batch, not per request) and its forward runs, both on a dedicated
thread, never on the event loop; a value that fails to encode fails only its own request.
Bad requests get a JSON ``{"error": ...}``:
malformed JSON 400, unknown field / wrong type / ragged columns 400 naming the field, body
over ``max_body_bytes`` 413, more than ``max_rows`` rows 413, non-JSON content type 415, and
a full queue (over ``max_queue_rows`` rows waiting) 503 with ``Retry-After``.

Example::

    ctr serve artifacts/deepfm --port 8080
    curl -s localhost:8080/v1/predict -H 'content-type: application/json' \\
         -d '{"instances": [{"C1": "68fd1e64", "I1": 3}]}'
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import select
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from torchrec import KeyedJaggedTensor

from ctr.artifact import MANIFEST_FILE, ArtifactError, CompactModel
from datasets.encode import EncodedRecords, RawEncoder

log = logging.getLogger("ctr.serve")

MiB = 1 << 20
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = tuple(2**k for k in range(17))
JSON_TYPES = ("application/json",)


@dataclass
class ServeConfig:
    """Limits and batching of one server."""

    max_batch: int = 4096
    # 0: a batch is what queued while the previous forward ran; > 0 waits for fuller batches
    max_delay_ms: float = 0.0
    max_body_bytes: int = 8 * MiB
    max_rows: int = 16384
    max_queue_rows: int = 65536
    poll_s: float = 2.0
    # binary artifacts: "bits" holds exactly the artifact's bytes (serve_bytes); "auto",
    # "planes" and "rows" serve through fbgemm rows, faster and larger (resident_bytes).
    binary_decode: str = "bits"
    # server processes on the one port (see ``serve``)
    workers: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_body_bytes", "max_rows", "max_queue_rows", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_delay_ms < 0 or self.poll_s < 0:
            raise ValueError("--max-delay-ms and --poll-s must not be negative")
        if self.max_rows > self.max_queue_rows:
            # A request larger than the queue could never be accepted.
            raise ValueError(
                f"--max-rows ({self.max_rows}) must not exceed --max-queue-rows "
                f"({self.max_queue_rows})"
            )


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# ------------------------------------------------------------------------------ the loaded model


@dataclass
class Served:
    """A loaded, verified artifact and what answering with it needs."""

    model: CompactModel
    path: Path
    checksum: str
    encoder: RawEncoder | None
    dense: list[str]
    sparse: list[dict[str, Any]]
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.path.name

    def metadata(self) -> dict[str, Any]:
        manifest = self.model.manifest
        emb = manifest["embedding"]
        memory = emb.get("memory", {})
        footprint = serving_footprint(manifest)
        return {
            "version": self.version,
            "path": str(self.path),
            "checksum": self.checksum,
            "loaded_at": self.loaded_at,
            "model": manifest["model"],
            "method": emb["method"],
            "hyperparameters": emb.get("hyperparameters", {}),
            "dim": emb["dim"],
            "fields": [{"name": d, "kind": "dense"} for d in self.dense]
            + [
                {
                    "name": f["name"],
                    "kind": "multi_hot" if f["multi_hot"] else "sparse",
                    "cardinality": f["cardinality"],
                }
                for f in self.sparse
            ],
            "serve_bytes": emb["serve_bytes"],
            "ratio": memory.get("full_bytes", 0) / max(emb["serve_bytes"], 1),
            "footprint": footprint,
            # In memory after loading (binary's fast decode holds more than serve_bytes).
            "resident_bytes": self.model.resident_bytes,
            "fingerprint_fields": self.model.fingerprint_fields,
            "dataset": (manifest.get("dataset") or {}).get("name"),
            "inputs": {"raw": self.encoder is not None, "ids": True},
        }


def serving_footprint(manifest: dict[str, Any]) -> dict[str, int]:
    """What a server holds for the embeddings: the tables (``serve_bytes``) and, when raw values
    are served through an id vocabulary, the vocabulary as the artifact stores it."""
    tables = int(manifest["embedding"]["serve_bytes"])
    recorded = manifest["embedding"].get("footprint")
    return dict(recorded) if recorded else {"tables": tables, "vocabulary": 0, "total": tables}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_served(path: Path, binary_decode: str = "bits") -> Served:
    """Loads and verifies ``path`` (checksums, shapes, a warm-up forward) or raises."""
    model = CompactModel.load(
        path, verify=True, serving_options={"binary": {"decode": binary_decode}}
    )
    try:
        encoder: RawEncoder | None = model.raw_encoder
    except ArtifactError:
        encoder = None
    info = model.manifest.get("dataset") or {}
    served = Served(
        model=model,
        path=path,
        checksum=_sha256(path / MANIFEST_FILE),
        encoder=encoder,
        dense=list(info.get("dense", [])),
        sparse=list(model.manifest["features"]),
    )
    # Warm up (fbgemm's first call, the encoder's per-field indexes) and check the output.
    encoded = (
        encoder.encode_columns({encoder.fields[0]: [None]})  # builds every field's index
        if encoder is not None
        else ids_records(served, {}, 1)
    )
    probs = forward(served, [encoded])
    if not np.isfinite(probs).all():
        raise ArtifactError(f"{path}: the model predicts non-finite values")
    return served


def resolve_artifact(source: Path) -> Path:
    """``source`` itself when it is an artifact, else its newest version subdirectory."""
    if (source / MANIFEST_FILE).exists():
        return source
    if not source.is_dir():
        raise ArtifactError(f"{source}: no such artifact or directory")
    versions = [
        d
        for d in source.iterdir()
        if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST_FILE).exists()
    ]
    if not versions:
        raise ArtifactError(
            f"{source}: not an artifact (no {MANIFEST_FILE}) and holds no artifact versions"
        )
    return max(versions, key=_version_key)


def _version_key(path: Path) -> tuple[Any, ...]:
    """Natural order: v2 < v10; numeric runs compare as numbers."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", path.name)
        if part
    )


# ----------------------------------------------------------------------------------- encoding


def request_columns(payload: Any, accepted: set[str], max_rows: int) -> tuple[dict, int, bool]:
    """Validates a parsed request body -> (field -> list of values, rows, ids mode)."""
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object with 'instances' or 'inputs'")
    unknown = sorted(set(payload) - {"instances", "inputs", "ids"})
    if unknown:
        raise RequestError(
            400, f"unknown field {unknown[0]!r} in the request; expected instances, inputs, ids"
        )
    ids = payload.get("ids", False)
    if not isinstance(ids, bool):
        raise RequestError(400, f"field 'ids': expected true or false, got {_kind(ids)}")
    if ("instances" in payload) == ("inputs" in payload):
        raise RequestError(400, "give exactly one of 'instances' (rows) or 'inputs' (columns)")
    if "instances" in payload:
        rows = payload["instances"]
        if not isinstance(rows, list):
            raise RequestError(400, f"field 'instances': expected a list, got {_kind(rows)}")
        n = len(rows)
        _check_rows(n, max_rows)
        # Field by field rather than row by row: the loops run in C (this is on the event loop).
        if not all(isinstance(row, dict) for row in rows):
            i, row = next((i, r) for i, r in enumerate(rows) if not isinstance(r, dict))
            raise RequestError(400, f"instances[{i}]: expected an object, got {_kind(row)}")
        present = set().union(*rows)
        if not present <= accepted:
            i, key = next((i, k) for i, r in enumerate(rows) for k in r if k not in accepted)
            raise RequestError(
                400, f"instances[{i}]: unknown field {key!r}; expected {sorted(accepted)}"
            )
        return {key: [row.get(key) for row in rows] for key in present}, n, ids
    columns = payload["inputs"]
    if not isinstance(columns, dict):
        raise RequestError(400, f"field 'inputs': expected an object, got {_kind(columns)}")
    for key, values in columns.items():
        if key not in accepted:
            raise RequestError(400, f"inputs: unknown field {key!r}; expected {sorted(accepted)}")
        if not isinstance(values, list):
            raise RequestError(400, f"inputs.{key}: expected a list, got {_kind(values)}")
    sizes = {k: len(v) for k, v in columns.items()}
    if len(set(sizes.values())) > 1:
        longest = max(sizes, key=sizes.__getitem__)
        shortest = min(sizes, key=sizes.__getitem__)
        raise RequestError(
            400,
            f"inputs: ragged columns: {shortest!r} has {sizes[shortest]} values, "
            f"{longest!r} has {sizes[longest]}",
        )
    n = next(iter(sizes.values()), 0)
    _check_rows(n, max_rows)
    return columns, n, ids


def _check_rows(n: int, max_rows: int) -> None:
    if n == 0:
        raise RequestError(400, "no rows to predict")
    if n > max_rows:
        raise RequestError(413, f"{n} rows exceed the limit of {max_rows} per request")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def ids_records(served: Served, columns: dict[str, list[Any]], n: int) -> EncodedRecords:
    """Prepared ids (sparse) and transformed floats (dense), validated per field."""
    dense = np.zeros((n, len(served.dense)), dtype=np.float32)
    for j, name in enumerate(served.dense):
        if name in columns:
            dense[:, j] = _numbers(name, columns[name])
    sparse: dict[str, np.ndarray | list[np.ndarray]] = {}
    lengths: dict[str, np.ndarray] = {}
    keyed = set(served.model.fingerprint_fields)
    for f in served.sparse:
        # A fingerprint-keyed field's "id" is the raw value's 64-bit fingerprint.
        name, card = f["name"], (None if f["name"] in keyed else f["cardinality"])
        values = columns.get(name)
        if f["multi_hot"]:
            bags = [[] if v is None else v for v in (values or [None] * n)]
            if any(not isinstance(b, list) for b in bags):
                raise RequestError(400, f"field {name!r}: expected lists of ids")
            lengths[name] = np.fromiter(map(len, bags), dtype=np.int64, count=n)
            flat = _ids(name, [x for b in bags for x in b], card)
            sparse[name] = np.split(flat, np.cumsum(lengths[name])[:-1])
        else:
            sparse[name] = np.zeros(n, np.int64) if values is None else _ids(name, values, card)
    return EncodedRecords(dense, sparse, lengths)


def _ids(name: str, values: list[Any], cardinality: int | None) -> np.ndarray:
    kinds = set(map(type, values))
    if not kinds <= {int, type(None)}:
        bad = next(v for v in values if type(v) not in (int, type(None)))
        raise RequestError(400, f"field {name!r}: ids must be integers, got {_kind(bad)}")
    if type(None) in kinds:
        values = [0 if v is None else v for v in values]
    try:
        ids = np.asarray(values, dtype=np.int64)
    except OverflowError:
        raise RequestError(400, f"field {name!r}: id out of range") from None
    if cardinality is not None and len(ids) and (ids.min() < 0 or ids.max() >= cardinality):
        raise RequestError(400, f"field {name!r}: ids must lie in [0, {cardinality})")
    return ids


def _numbers(name: str, values: list[Any]) -> np.ndarray:
    kinds = set(map(type, values))
    if not kinds <= {int, float, type(None)}:
        bad = next(v for v in values if type(v) not in (int, float, type(None)))
        raise RequestError(400, f"field {name!r}: expected numbers, got {_kind(bad)}")
    try:
        return np.asarray([0.0 if v is None else v for v in values], dtype=np.float32)
    except OverflowError:
        raise RequestError(400, f"field {name!r}: number out of range") from None


def forward(served: Served, parts: Sequence[EncodedRecords]) -> np.ndarray:
    """Click probabilities of the concatenated ``parts`` in one model forward."""
    dense = torch.from_numpy(
        np.concatenate([p.dense for p in parts]) if len(parts) > 1 else parts[0].dense
    )
    n = dense.shape[0]
    values, lengths = [], []
    ones = np.ones(max(len(p.dense) for p in parts), dtype=np.int64)
    for f in served.sparse:
        name = f["name"]
        for p in parts:
            ids = p.sparse[name]
            if isinstance(ids, list):
                lens = p.lengths.get(name)
                if lens is None:
                    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                values.append(np.concatenate(ids) if ids else np.zeros(0, np.int64))
                lengths.append(lens)
            else:
                values.append(ids)
                lengths.append(ones[: len(ids)])
    kjt = KeyedJaggedTensor(
        keys=[f["name"] for f in served.sparse],
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
        stride=n,
    )
    with torch.inference_mode():
        return torch.sigmoid(served.model(dense, kjt)).numpy()


# ------------------------------------------------------------------------------------ metrics


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.buckets) if value <= b), -1)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    """The server's counters, rendered in Prometheus' text exposition format."""

    def __init__(self, worker: tuple[int, int] | None = None) -> None:
        self.worker = worker  # (index, count) under --workers
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.rows_predicted = 0
        self.reloads: Counter[str] = Counter()

    def render(self, queue_rows: int, queue_requests: int, served: Served) -> str:
        lines = [
            "# HELP ctr_requests_total HTTP requests by path and status.",
            "# TYPE ctr_requests_total counter",
        ]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'ctr_requests_total{{path="{path}",status="{status}"}} {n}')
        lines += self.latency.render(
            "ctr_request_latency_seconds", "Latency of /v1/predict requests (all statuses)."
        )
        lines += self.batch_rows.render("ctr_batch_rows", "Rows per model forward.")
        lines += [
            "# HELP ctr_rows_predicted_total Rows answered with a prediction.",
            "# TYPE ctr_rows_predicted_total counter",
            f"ctr_rows_predicted_total {self.rows_predicted}",
            "# HELP ctr_queue_rows Rows accepted and waiting for a forward.",
            "# TYPE ctr_queue_rows gauge",
            f"ctr_queue_rows {queue_rows}",
            "# HELP ctr_queue_requests Requests accepted and waiting for a forward.",
            "# TYPE ctr_queue_requests gauge",
            f"ctr_queue_requests {queue_requests}",
            "# HELP ctr_reloads_total Artifact reloads by result.",
            "# TYPE ctr_reloads_total counter",
        ]
        for result in ("swapped", "unchanged", "refused"):
            lines.append(f'ctr_reloads_total{{result="{result}"}} {self.reloads[result]}')
        lines += [
            "# HELP ctr_model_info The artifact being served.",
            "# TYPE ctr_model_info gauge",
            f'ctr_model_info{{version="{served.version}",checksum="{served.checksum}"}} 1',
        ]
        if self.worker is not None:
            index, count = self.worker
            lines += [
                "# HELP ctr_worker The worker process that answered (each counts its own).",
                "# TYPE ctr_worker gauge",
                f'ctr_worker{{index="{index}",workers="{count}",pid="{os.getpid()}"}} 1',
            ]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- batching


@dataclass
class RawColumns:
    """A request's validated raw columns, encoded with the rest of its batch."""

    columns: dict[str, list[Any]]
    rows: int


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
    fields = dict.fromkeys(k for it in items for k in it.columns)
    columns = {k: [v for it in items for v in it.columns.get(k, [None] * it.rows)] for k in fields}
    return RawColumns(columns, sum(it.rows for it in items))


def _encode_raw(served: Served, raw: RawColumns) -> EncodedRecords:
    assert served.encoder is not None
    try:
        return served.encoder.encode_columns(raw.columns, raw.rows)
    except (ValueError, OverflowError, TypeError, pa.ArrowException) as e:
        raise RequestError(400, str(e)) from e


class Batcher:
    """Coalesces queued requests into forwards of at most ``max_batch`` rows.

    A batch closes when it is full, when ``max_delay`` passed since its first request (and
    the previous forward is done), or when the next request was accepted by another model
    (after a swap); while one forward runs, the next batch fills. Only requests of the same
    model share a forward.
    """

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
        return await future

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
            probs, outcome = await asyncio.get_running_loop().run_in_executor(
                self.executor, run_batch, served, [p.encoded for p in batch]
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


# -------------------------------------------------------------------------------- hot swapping


class ModelManager:
    """The served model, and atomic swaps to a newly loaded and verified one."""

    def __init__(
        self,
        source: Path,
        served: Served,
        metrics: Metrics,
        poll_s: float,
        binary_decode: str = "bits",
    ) -> None:
        self.source = source
        self.binary_decode = binary_decode
        self.current = served
        self.metrics = metrics
        self.poll_s = poll_s
        self.versioned = not (source / MANIFEST_FILE).exists()
        self.last_error: str | None = None
        self._refused: dict[Path, int] = {}  # path -> manifest mtime when refused
        self._lock = asyncio.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="ctr-loader")
        self._tasks: set[asyncio.Task] = set()

    async def reload(self, reason: str) -> dict[str, Any]:
        """Loads the source's artifact (newest version) and swaps it in; raises
        :class:`RequestError` (409) when it is refused — the current model keeps serving."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                path = await loop.run_in_executor(self._loader, resolve_artifact, self.source)
                checksum = await loop.run_in_executor(self._loader, _sha256, path / MANIFEST_FILE)
                if path == self.current.path and checksum == self.current.checksum:
                    self.metrics.reloads["unchanged"] += 1
                    return {"swapped": False, "version": self.current.version}
                served = await loop.run_in_executor(
                    self._loader, load_served, path, self.binary_decode
                )
            except Exception as e:
                self.metrics.reloads["refused"] += 1
                self.last_error = f"{e}"
                with contextlib.suppress(OSError, UnboundLocalError):
                    self._refused[path] = (path / MANIFEST_FILE).stat().st_mtime_ns
                log.warning(
                    "reload (%s) refused, still serving %s: %s", reason, self.current.path, e
                )
                raise RequestError(
                    409, f"refused: {e}; still serving version {self.current.version!r}"
                ) from e
            old, self.current = self.current, served
            self.metrics.reloads["swapped"] += 1
            log.warning("reload (%s): %s -> %s", reason, old.path, served.path)
            return {"swapped": True, "version": served.version, "checksum": served.checksum}

    def reload_soon(self, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._quiet_reload(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quiet_reload(self, reason: str) -> None:
        with contextlib.suppress(RequestError):
            await self.reload(reason)

    async def poll(self) -> None:
        """Watches a directory of versions for a newer one (refused versions are skipped
        until their manifest changes)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                path = await loop.run_in_executor(self._loader, resolve_artifact, self.source)
                mtime = (path / MANIFEST_FILE).stat().st_mtime_ns
            except (ArtifactError, OSError):
                continue
            if path != self.current.path and self._refused.get(path) != mtime:
                await self._quiet_reload("new version")

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------ the app


def create_app(
    source: str | Path,
    config: ServeConfig | None = None,
    on_ready: Any = None,
    served: Served | None = None,
    worker: tuple[int, int] | None = None,
    on_reload: Any = None,
) -> Starlette:
    """The ASGI app serving ``source`` (an artifact, or a directory of artifact versions);
    loads and verifies it first (raises :class:`ArtifactError` when it cannot) unless
    ``served`` is that model already loaded. ``on_ready`` (optional) is called once the app
    has started and takes requests; ``on_reload`` after ``POST /v1/reload`` swapped a model
    in; ``worker`` is (index, count) of a server process among ``--workers``."""
    config = config or ServeConfig()
    source = Path(source)
    metrics = Metrics(worker)
    source = source.resolve()
    manager = ModelManager(
        source,
        served or load_served(resolve_artifact(source), config.binary_decode),
        metrics,
        config.poll_s,
        config.binary_decode,
    )
    batcher = Batcher(config, metrics)
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        batcher.start()
        poller = loop.create_task(manager.poll()) if manager.versioned and config.poll_s else None
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, manager.reload_soon, "SIGHUP")
        state["ready"] = True
        if on_ready is not None:
            on_ready(manager.current)
        try:
            yield
        finally:
            state["ready"] = False
            if poller is not None:
                poller.cancel()
            await batcher.stop()
            manager.close()

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        status = 200
        try:
            served = manager.current
            payload = await _read_json(request, config.max_body_bytes)
            accepted = (
                (
                    set(served.dense) | {f["name"] for f in served.sparse}
                    if payload.get("ids") is True or served.encoder is None
                    else set(served.encoder.fields)
                )
                if isinstance(payload, dict)
                else set()
            )
            columns, n, ids = request_columns(payload, accepted, config.max_rows)
            if not ids and served.encoder is None:
                raise RequestError(
                    400, 'this artifact was exported without its vocabulary; send "ids": true'
                )
            encoded: EncodedRecords | RawColumns = (
                await run_in_threadpool(ids_records, served, columns, n)
                if ids
                else RawColumns(columns, n)
            )
            predictions = await batcher.submit(served, encoded, n)
            metrics.rows_predicted += n
            return JSONResponse({"predictions": predictions})
        except RequestError as e:
            status = e.status
            return error(e)
        except RecursionError:
            status = 400  # a value nested too deeply for the encoder: the request's fault
            return error(RequestError(400, "malformed request: a value is nested too deeply"))
        except Exception as e:
            status = 500
            log.exception("predict failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
        finally:
            metrics.requests["/v1/predict", status] += 1
            metrics.latency.observe(time.perf_counter() - start)

    async def metadata(request: Request) -> Response:
        metrics.requests["/v1/metadata", 200] += 1
        return JSONResponse(manager.current.metadata())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not state["ready"]:
            return JSONResponse({"status": "not ready"}, 503)
        served = manager.current
        return JSONResponse({"status": "ready", "version": served.version})

    async def reload(request: Request) -> Response:
        try:
            result = await manager.reload("POST /v1/reload")
            status = 200
            if on_reload is not None and result.get("swapped"):
                on_reload()
            return JSONResponse(result)
        except RequestError as e:
            status = e.status
            return error(e)
        finally:
            metrics.requests["/v1/reload", status] += 1

    async def prometheus(request: Request) -> Response:
        text = metrics.render(batcher.queued_rows, batcher.queue.qsize(), manager.current)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    app = Starlette(
        routes=[
            Route("/v1/predict", predict, methods=["POST"]),
            Route("/v1/metadata", metadata, methods=["GET"]),
            Route("/v1/reload", reload, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.batcher = batcher
    return app


def _reject_constant(name: str) -> Any:
    raise RequestError(400, f"{name} is not a JSON number; send finite numbers or null")


async def _read_json(request: Request, limit: int) -> Any:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise RequestError(415, f"content type {media or 'none'!r}; send application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {int(declared)} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body exceeds the limit of {limit} bytes")
    try:
        # Decoded explicitly: json.loads(bytes) would also guess UTF-16/32 from a BOM.
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError(
            400, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not UTF-8 ({e.reason})") from None
    except RecursionError:
        # No request nests deeper than rows of lists of values; json gives up far deeper.
        raise RequestError(400, "malformed request: JSON nested too deeply") from None


def serve(
    source: str | Path, host: str = "127.0.0.1", port: int = 8080, config: ServeConfig | None = None
) -> None:
    """Runs the server until interrupted; prints the address once it listens (with
    ``config.workers`` > 1: once every worker does; see :func:`_serve_workers`)."""
    import uvicorn

    config = config or ServeConfig()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if config.workers > 1:
        _serve_workers(source, family, host, port, config)
        return
    sock = _listener(family, host, port)
    bound = sock.getsockname()[1]
    app = create_app(source, config, on_ready=lambda served: _announce(served, host, bound))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    )
    server.run(sockets=[sock])


def _listener(family: int, host: str, port: int, reuse_port: bool = False) -> socket.socket:
    # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted sockets
    # whose proto says TCP, and without it Nagle's algorithm holds a response's body (written
    # after its headers) until the client's delayed ACK, ~40 ms per keep-alive request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def _announce(served: Served, host: str, port: int, workers: int = 1) -> None:
    # Printed once requests are taken, so a script may start sending when it sees it.
    manifest = served.model.manifest
    print(
        f"serving {served.path} ({manifest['model']['name']} + "
        f"{manifest['embedding']['method']}) on http://{host}:{port}"
        + (f" ({workers} workers)" if workers > 1 else ""),
        flush=True,
    )


def _serve_workers(
    source: str | Path, family: int, host: str, port: int, config: ServeConfig
) -> None:
    """``config.workers`` server processes on one port, forked from this one once it has
    loaded and verified the model, so the workers share its tables' memory (copy-on-write
    pages that serving never writes) instead of loading a copy each.

    Each worker listens on its own socket bound to the port with ``SO_REUSEPORT``: the kernel
    spreads new connections evenly over them (one shared listening socket lets whichever
    event loop wakes first accept a whole burst). Each worker runs one forward thread with
    one intra-op thread: N workers for N cores.

    Per worker, as documented in the README: every worker has its own queue, batcher and
    counters (``/metrics`` answers for the worker that took the connection, named by the
    ``ctr_worker`` line). A hot swap loads the new version in each worker (a swapped-in model
    is each worker's own copy): ``SIGHUP`` to this process reaches every worker, a
    ``POST /v1/reload`` that swaps tells this process to reload the others, and each worker
    polls a directory of versions. A worker that dies is started again (after a second) and
    first reloads, to serve the version the others serve. ``SIGTERM``/``SIGINT`` stop all.
    """
    import uvicorn

    torch.set_num_threads(1)  # before any forward: no intra-op threads exist at the fork
    resolved = Path(source).resolve()
    served = load_served(resolve_artifact(resolved), config.binary_decode)
    # Holds the port (bound, not listening: it takes no connections) for restarted workers.
    keeper = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    keeper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    keeper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    keeper.bind((host, port))
    port = keeper.getsockname()[1]
    ready_r, ready_w = os.pipe()
    parent = os.getpid()
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def start(index: int, restarted: bool) -> None:
        pid = os.fork()
        if pid:
            children[pid] = index
            return
        code = 1
        try:  # the worker: never returns into the supervisor's code
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app handles it
            os.close(ready_r)
            keeper.close()
            sock = _listener(family, host, port, reuse_port=True)
            app = create_app(
                resolved,
                config,
                on_ready=lambda _: ready(app, restarted),
                served=served,
                worker=(index, config.workers),
                on_reload=lambda: os.kill(parent, signal.SIGUSR1),
            )
            uvicorn.Server(
                uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
            ).run(sockets=[sock])
            code = 0
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            os._exit(code)

    def ready(app: Starlette, restarted: bool) -> None:
        if restarted:
            app.state.manager.reload_soon("worker restart")
        os.write(ready_w, b"r")

    def forward(sig: int) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def on_stop(sig: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        forward(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda sig, frame: forward(signal.SIGHUP))
    signal.signal(signal.SIGUSR1, lambda sig, frame: forward(signal.SIGHUP))
    for index in range(config.workers):
        start(index, restarted=False)
    announced, ready_count = False, 0
    try:
        while children:
            if not announced:
                if select.select([ready_r], [], [], 0.2)[0]:
                    ready_count += len(os.read(ready_r, 64))
                    if ready_count >= config.workers:
                        _announce(served, host, port, config.workers)
                        announced = True
                pid, status = os.waitpid(-1, os.WNOHANG)
            else:
                pid, status = os.waitpid(-1, 0)
            if not pid:
                continue
            index = children.pop(pid)
            if stopping:
                continue
            if not announced:
                raise RuntimeError(f"worker {index} exited during start-up (status {status})")
            log.warning(
                "worker %d (pid %d) exited with status %d; starting it again", index, pid, status
            )
            time.sleep(1.0)
            start(index, restarted=True)
    finally:
        forward(signal.SIGTERM)
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        keeper.close()
