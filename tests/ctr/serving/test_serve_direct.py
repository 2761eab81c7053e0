"""The protocol's own answer to ``POST /v1/predict`` equals the ASGI endpoint's.

One in-process server (uvicorn with ``ctr serve``'s protocol, in a thread, on an ephemeral
127.0.0.1 port). A request with a query string takes uvicorn's ASGI path to the same endpoint;
the same request without it is answered by the protocol: status, headers (but the date) and
body must be equal, and the direct answers must be counted as such.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import torch

from ctr import EmbeddingLayer, build_model, export, features_from_dataset


def _export(data, out):
    torch.manual_seed(0)
    layer = EmbeddingLayer(features_from_dataset(data), 8, "full", "1x", init_scale=0.1)
    export(build_model("deepfm", layer, 3, hidden=[16]).eval(), out, dataset=data)


@pytest.fixture(scope="module")
def server(tiny_data, tmp_path_factory):
    import uvicorn

    from ctr.serving.http.app import _listener, _uvicorn_config, create_app
    from ctr.serving.http.config import ServeConfig

    root = tmp_path_factory.mktemp("direct")
    _export(tiny_data, root / "model")
    config = ServeConfig(max_rows=50, max_body_bytes=4096, max_queue_rows=100)
    app = create_app(root / "model", config)
    sock = _listener(socket.AF_INET, "127.0.0.1", 0)
    port = sock.getsockname()[1]
    uv = uvicorn.Server(_uvicorn_config(app))
    thread = threading.Thread(target=lambda: asyncio.run(uv.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started
    try:
        yield app, port
    finally:
        uv.should_exit = True
        thread.join(30)


def _exchange(port: int, raw: bytes, answers: int = 1) -> list[tuple[str, dict, bytes]]:
    """Sends ``raw`` on a fresh connection; reads ``answers`` answers (until EOF if the
    server closes)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        buf = b""
        while len(out) < answers:
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, f"connection closed after {buf!r}"
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                k, v = line.split(": ", 1)
                headers[k.lower()] = v
            n = int(headers["content-length"])
            while len(buf) < n:
                chunk = s.recv(65536)
                assert chunk
                buf += chunk
            body, buf = buf[:n], buf[n:]
            headers.pop("date", None)
            out.append((lines[0], headers, body))
    return out


def _request(path: str, body: bytes, extra: str = "", ctype: str = "application/json") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {ctype}\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


GOOD = json.dumps({"instances": [{"C1": "a", "I1": 3}, {}]}).encode()
CASES = [
    (GOOD, "application/json", ""),
    (b'{"instances": [{"C1": "3"', "application/json", ""),
    (b"\xff\xfe", "application/json", ""),
    (json.dumps({"instances": [{"Cx": "3"}]}).encode(), "application/json", ""),
    (json.dumps({"instances": [{}] * 60}).encode(), "application/json", ""),  # 413 rows
    (b"{}" + b" " * 5000, "application/json", ""),  # 413 body: refused by both
    (GOOD, "text/plain", ""),  # 415: refused by both
    (GOOD, "application/json", "connection: close\r\n"),
]


@pytest.mark.parametrize("body,ctype,extra", CASES)
def test_direct_answer_equals_asgi_answer(server, body, ctype, extra):
    app, port = server
    before = app.state.direct.answered
    (asgi,) = _exchange(port, _request("/v1/predict?via=asgi", body, extra, ctype))
    assert app.state.direct.answered == before
    (direct,) = _exchange(port, _request("/v1/predict", body, extra, ctype))
    assert direct == asgi
    # The type and length refused before the body is read take the ASGI path.
    taken = ctype == "application/json" and len(body) <= 4096
    assert app.state.direct.answered == before + taken
    if body is GOOD and ctype == "application/json":
        assert asgi[0] == "HTTP/1.1 200 OK" and len(json.loads(direct[2])["predictions"]) == 2


def test_pipelined_and_http10(server):
    app, port = server
    before = app.state.direct.answered
    bodies = [json.dumps({"instances": [{"I1": i}]}).encode() for i in range(4)]
    raw = b"".join(
        _request("/v1/predict" + ("?q" if i == 2 else ""), b) for i, b in enumerate(bodies)
    )
    answers = _exchange(port, raw, answers=4)
    singles = [_exchange(port, _request("/v1/predict", b))[0] for b in bodies]
    assert answers == singles  # in order, whichever path each took
    assert app.state.direct.answered > before
    # HTTP/1.0: answered, then closed, as the ASGI path does.
    raw10 = _request("/v1/predict", GOOD).replace(b"HTTP/1.1", b"HTTP/1.0")
    asgi10 = _request("/v1/predict?q", GOOD).replace(b"HTTP/1.1", b"HTTP/1.0")
    assert _exchange(port, raw10) == _exchange(port, asgi10)
    assert _exchange(port, raw10)[0][1]["connection"] == "close"
    # Expect: 100-continue takes the ASGI path (which sends the interim answer).
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            _request("/v1/predict", b"", "expect: 100-continue\r\n").replace(
                b"content-length: 0", f"content-length: {len(GOOD)}".encode()
            )
        )
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(GOOD)
        got = b""
        while b'"predictions"' not in got:
            chunk = s.recv(65536)
            assert chunk
            got += chunk
        assert got.startswith(b"HTTP/1.1 200")
