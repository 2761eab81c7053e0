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
thread (a batch of at most 16 rows with nothing queued behind it: on the event loop, without
thread hand-offs); a value that fails to encode fails only its own request.
Bad requests get a JSON ``{"error": ...}``:
malformed JSON 400, unknown field / wrong type / ragged columns 400 naming the field, body
over ``max_body_bytes`` 413, more than ``max_rows`` rows 413, non-JSON content type 415, and
a full queue (over ``max_queue_rows`` rows waiting) 503 with ``Retry-After``.

Example::

    ctr serve artifacts/deepfm --port 8080
    ctr serve artifacts/binary --serving-opt binary.decode=auto   # faster, larger decode
    curl -s localhost:8080/v1/predict -H 'content-type: application/json' \\
         -d '{"instances": [{"C1": "68fd1e64", "I1": 3}]}'
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ctr.serving.http.batcher import Batcher, RawColumns
from ctr.serving.http.config import ServeConfig
from ctr.serving.http.metrics import Metrics
from ctr.serving.http.models import Served, load_served, resolve_artifact
from ctr.serving.http.reload import ModelManager, settle_gc
from ctr.serving.http.requests import (
    RequestError,
    check_media,
    ids_records,
    parse_json,
    read_body,
    request_columns,
)

log = logging.getLogger("ctr.serve")


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
        served or load_served(resolve_artifact(source), config.module_options()),
        metrics,
        config.poll_s,
        config.module_options(),
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

    def begin(body: bytes) -> tuple[asyncio.Future, int]:
        """A predict request's body -> (the future of its predictions, its rows): validated
        and queued (raises :class:`RequestError` for a bad request or a full queue)."""
        served = manager.current
        payload = parse_json(body)
        accepted = (
            (
                served.id_fields
                if payload.get("ids") is True or served.encoder is None
                else served.raw_fields
            )
            if isinstance(payload, dict)
            else frozenset()
        )
        columns, n, ids = request_columns(payload, accepted, config.max_rows, keep_rows=True)
        if not ids and served.encoder is None:
            raise RequestError(
                400, 'this artifact was exported without its vocabulary; send "ids": true'
            )
        if ids:  # encoded off the event loop, then queued
            return asyncio.ensure_future(_submit_ids(served, columns, n)), n
        return batcher.enqueue(served, RawColumns(columns, n), n), n

    async def _submit_ids(served: Served, columns: Any, n: int) -> list[float]:
        encoded = await run_in_threadpool(ids_records, served, columns, n)
        return await batcher.enqueue(served, encoded, n)

    def answer(future: asyncio.Future, n: int) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, body, extra headers) of a request whose predictions' future is done."""
        if future.cancelled():
            return failure(RuntimeError("the request was cancelled"))
        e = future.exception()
        if e is not None:
            return failure(e)
        metrics.rows_predicted += n
        return 200, orjson.dumps({"predictions": future.result()}), []

    def record(status: int, start: float) -> None:
        metrics.requests["/v1/predict", status] += 1
        metrics.latency.observe(time.perf_counter() - start)

    async def predict(scope: Scope, receive: Receive, send: Send) -> None:
        # A raw ASGI endpoint (no Request/Response objects, no middleware: ``_App`` calls it
        # directly); the usual request does not even get here (see :class:`DirectPredict`).
        start = time.perf_counter()
        try:
            content_type, content_length = _content_headers(scope["headers"])
            check_media(content_type, content_length, config.max_body_bytes)
            future, n = begin(await read_body(_chunks(receive), config.max_body_bytes))
            with contextlib.suppress(Exception):
                await future
            status, body, headers = answer(future, n)
        except Exception as e:
            status, body, headers = failure(e)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        *headers,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            record(status, start)

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

    app = _App(
        predict,
        routes=[
            Route("/v1/predict", _AsgiEndpoint(predict), methods=["POST"]),
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
    app.state.direct = DirectPredict(begin, answer, record, config.max_body_bytes)
    return app


class _App(Starlette):
    """The Starlette app, with ``POST /v1/predict`` answered by its raw ASGI endpoint before
    the routing and middleware (other paths and methods, 405 included, go through them)."""

    def __init__(self, predict: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._predict = predict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PREDICT and scope["method"] == "POST":
            await self._predict(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class _AsgiEndpoint:
    """A raw ASGI callable as a route's endpoint (a function would be wrapped as a request
    handler); the route keeps its method check."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


PREDICT = "/v1/predict"


def failure(e: BaseException) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """(status, body, extra headers) of a predict request that raised ``e``."""
    if isinstance(e, RequestError):
        return e.status, _error_body(e.message), _raw_headers(e.headers)
    if isinstance(e, RecursionError):  # a value nested too deeply for the encoder
        return 400, _error_body("malformed request: a value is nested too deeply"), []
    log.error("predict failed", exc_info=e)
    return 500, _error_body(f"internal error: {type(e).__name__}: {e}"), []


class DirectPredict:
    """``POST /v1/predict`` as the connection's protocol answers it itself (see
    :func:`_protocol_class`): the same validation, queueing and answers as the ASGI endpoint
    (``begin``, ``answer``, ``record`` are shared with it), without the ASGI machinery.
    ``answered`` counts the requests answered this way."""

    __slots__ = ("begin", "answer", "record", "max_body_bytes", "answered")

    def __init__(self, begin: Any, answer: Any, record: Any, max_body_bytes: int) -> None:
        self.begin = begin
        self.answer = answer
        self.record = record
        self.max_body_bytes = max_body_bytes
        self.answered = 0


def _content_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str, str | None]:
    """(content type, content length or None) of a request's raw ASGI headers (the first of
    each, as Starlette's ``Headers.get``)."""
    ctype: str | None = None
    length: str | None = None
    for name, value in headers:
        if name == b"content-type" and ctype is None:
            ctype = value.decode("latin-1")
        elif name == b"content-length" and length is None:
            length = value.decode("latin-1")
    return ctype or "", length


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _error_body(message: str) -> bytes:
    try:
        return orjson.dumps({"error": message})
    except TypeError:  # a lone surrogate (from the request) is not UTF-8: escape it
        return json.dumps({"error": message}).encode()


def _raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


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

    def ready(served: Served) -> None:
        settle_gc()  # this process is the server: its collector may be tuned
        _announce(served, host, bound)

    app = create_app(source, config, on_ready=ready)
    server = uvicorn.Server(_uvicorn_config(app))
    server.run(sockets=[sock])


def _uvicorn_config(app: Starlette) -> Any:
    """uvicorn's settings: httptools (pinned; with each answer sent in one write, see
    :class:`OneSend`) and uvloop where installed, no access log, and no proxy-header
    rewriting (nothing here reads the client's address)."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=_protocol_class(),
        log_level="warning",
        access_log=False,
        lifespan="on",
        proxy_headers=False,
    )


def _protocol_class() -> Any:
    """uvicorn's httptools protocol on a :class:`OneSend` transport, answering the usual
    ``POST /v1/predict`` itself ("auto": uvicorn's own choice, where httptools is missing).

    A predict request with a ``Content-Length``, an accepted content type and length, no
    ``Expect``, query or upgrade, that arrives while the connection has no request in
    progress, is read by the protocol's parser callbacks and answered by
    :class:`DirectPredict` in one write: no ASGI scope, request cycle, task, or
    receive/send messages a request (about a fifth of a worker's CPU a row at 64 clients of
    8 rows). Every other request, refusals of the content type or length included, takes
    uvicorn's ASGI path to the same endpoint; a request pipelined behind a direct one is
    queued by uvicorn and started when the direct one is answered."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:
        return "auto"

    class _Direct:
        """The connection's request in progress, as uvicorn's protocol reads its ``cycle``."""

        __slots__ = ("chunks", "keep_alive", "response_complete", "disconnected", "start")

        def __init__(self, keep_alive: bool) -> None:
            self.chunks: list[bytes] = []
            self.keep_alive = keep_alive
            self.response_complete = False
            self.disconnected = False
            self.start = time.perf_counter()

        @property
        def message_event(self) -> _Direct:
            return self  # connection_lost sets it; nothing waits on it

        def set(self) -> None:
            pass

    class Protocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(OneSend(transport, self.loop))  # type: ignore[arg-type]
            self._direct: DirectPredict | None = getattr(
                getattr(self.config.app, "state", None), "direct", None
            )

        def on_headers_complete(self) -> None:
            direct = self._direct
            if (
                direct is None
                or self.url != PREDICT_URL
                or self.expect_100_continue
                or self.limit_concurrency is not None
                or self.root_path
                or (self.cycle is not None and not self.cycle.response_complete)
                or self.parser.get_method() != b"POST"
                or self.parser.should_upgrade()
            ):
                return super().on_headers_complete()
            content_type = content_length = None
            for name, value in self.headers:
                if name == b"content-type" and content_type is None:
                    content_type = value.decode("latin-1")
                elif name == b"content-length" and content_length is None:
                    content_length = value.decode("latin-1")
                elif name == b"transfer-encoding":
                    return super().on_headers_complete()
            if content_length is None or not content_length.isdigit():
                return super().on_headers_complete()
            try:
                check_media(content_type or "", content_length, direct.max_body_bytes)
            except RequestError:  # the ASGI endpoint refuses it, the same way
                return super().on_headers_complete()
            self.cycle = _Direct(  # type: ignore[assignment]
                self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
            )

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if type(cycle) is _Direct:
                # At most max_body_bytes in all (its Content-Length was checked); usually
                # one chunk, taken as it is.
                cycle.chunks.append(body)
            else:
                super().on_body(body)

        def on_message_complete(self) -> None:
            cycle = self.cycle
            if type(cycle) is not _Direct:
                return super().on_message_complete()
            direct = self._direct
            assert direct is not None
            try:
                chunks, cycle.chunks = cycle.chunks, []
                future, n = direct.begin(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            except Exception as e:
                self._answer(cycle, *failure(e))
                return
            future.add_done_callback(lambda f: self._answer(cycle, *direct.answer(f, n)))

        def _answer(
            self, cycle: _Direct, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
        ) -> None:
            direct = self._direct
            assert direct is not None
            direct.answered += 1
            direct.record(status, cycle.start)
            cycle.response_complete = True
            if cycle.disconnected:
                return
            # As uvicorn writes the ASGI endpoint's answer: its default headers, then the
            # endpoint's.
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: application/json\r\ncontent-length: "]
            head += [str(len(body)).encode(), b"\r\n"]
            for name, value in headers:
                head += [name, b": ", value, b"\r\n"]
            if not cycle.keep_alive:
                head.append(b"connection: close\r\n")
            head += [b"\r\n", body]
            self.transport.write(b"".join(head))
            if not cycle.keep_alive:
                self.transport.close()
            self.on_response_complete()

    return Protocol


PREDICT_URL = PREDICT.encode()


class OneSend:
    """A connection's transport that sends an answer's head together with its body.

    uvicorn writes a response as two transport writes, the head (status line and headers)
    on ``http.response.start`` and the body on ``http.response.body``; uvloop sends each at
    once, so every answer cost two ``send`` calls, two TCP segments through the kernel, and
    often two wake-ups of the client. Here a write that ends a head (``\\r\\n\\r\\n``) is
    held and sent with the next write: one ``send`` an answer. A held write that nothing
    follows (a streamed response's first chunk not ready yet, ``100 Continue``) is sent at the
    loop's next iteration, and before the connection closes. Everything else is the
    transport's own."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held:
            data, self._held = self._held + bytes(data), b""
        elif data[-4:] == b"\r\n\r\n":
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def flush(self) -> None:
        """Sends a held write now."""
        if self._held:
            held, self._held = self._held, b""
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


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
    reloads in the background, to serve the version the others serve (until that load is
    done it answers with the model loaded here). ``SIGTERM``/``SIGINT`` stop all.
    """
    import uvicorn

    torch.set_num_threads(1)  # before any forward: no intra-op threads exist at the fork
    resolved = Path(source).resolve()
    served = load_served(resolve_artifact(resolved), config.module_options())
    # Holds the port (bound, not listening: it takes no connections) for restarted workers.
    keeper = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    keeper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    keeper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    keeper.bind((host, port))
    port = keeper.getsockname()[1]
    # Frozen before the fork: the workers' collectors never walk (write) the shared objects.
    gc.collect()
    gc.freeze()
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
            uvicorn.Server(_uvicorn_config(app)).run(sockets=[sock])
            code = 0
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            os._exit(code)

    def ready(app: Starlette, restarted: bool) -> None:
        settle_gc()
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
