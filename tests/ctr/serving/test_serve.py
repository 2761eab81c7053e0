"""``ctr serve`` over real HTTP: uvicorn subprocesses on ephemeral 127.0.0.1 ports.

Two servers start together (importing torch dominates their start-up): ``plain`` serves one
artifact with small limits; ``versions`` serves a directory of versions for hot swapping.
Every loop is bounded and both processes are always terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from ctr import CompactModel, EmbeddingLayer, build_model, export, features_from_dataset
from datasets.encode import RawEncoder
from tests.helpers import ROOT

START_TIMEOUT_S = 180


class Server:
    def __init__(self, artifact: Path, log: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctr.cli", "serve", str(artifact), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
            env=env,
            text=True,
        )
        self.port = 0

    def wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    return
        raise TimeoutError(f"server did not start in {START_TIMEOUT_S}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | object | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, str], object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            headers = {"Content-Type": content_type} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            ctype = response.getheader("content-type", "")
            payload = json.loads(raw) if ctype.startswith("application/json") else raw.decode()
            return response.status, dict(response.getheaders()), payload
        finally:
            conn.close()

    def predict(self, body: object) -> list[float]:
        status, _, payload = self.request("POST", "/v1/predict", body)
        assert status == 200, payload
        return payload["predictions"]

    def metric(self, name: str) -> float:
        _, _, text = self.request("GET", "/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0


def _export(data: Path, out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    layer = EmbeddingLayer(features_from_dataset(data), 8, "full", "1x", init_scale=0.1)
    export(build_model("deepfm", layer, 3, hidden=[16]).eval(), out, dataset=data)


def _records(data: Path, n: int, seed: int) -> list[dict]:
    """Raw records drawn from the vocabulary, with unseen and missing values mixed in."""
    rng = np.random.default_rng(seed)
    encoder = RawEncoder.load(data)
    records = []
    for i in range(n):
        record: dict = {d: float(rng.normal()) for d in encoder.meta.dense if rng.random() < 0.9}
        for f in encoder.meta.sparse:
            values = encoder.vocabs[f.name].values
            pick = values[int(rng.integers(len(values)))].as_py()
            if f.multi_hot:
                record[f.name] = [pick, "never-seen"][: int(rng.integers(0, 3))]
            elif rng.random() < 0.8:
                record[f.name] = pick if i % 7 else "never-seen"
        records.append(record)
    return records


@pytest.fixture(scope="module")
def servers(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    _export(tiny_data, root / "plain", seed=0)
    _export(tiny_data, root / "versions" / "v1", seed=0)
    plain = Server(
        root / "plain",
        root / "plain.log",
        "--max-rows",
        "500",
        "--max-queue-rows",
        "700",
        "--max-body-mb",
        "0.1",
        "--max-delay-ms",
        "2",
    )
    versions = Server(root / "versions", root / "versions.log", "--poll-s", "0.2")
    try:
        plain.wait()
        versions.wait()
        yield {"plain": plain, "versions": versions, "root": root, "data": tiny_data}
    finally:
        plain.stop()
        versions.stop()


def test_predictions_equal_compact_model_in_both_forms(servers):
    server, data = servers["plain"], servers["data"]
    compact = CompactModel.load(servers["root"] / "plain")
    records = _records(data, 200, seed=1)
    expected = compact.predict_records(records)
    rows = server.predict({"instances": records})
    fields = sorted({k for r in records for k in r})
    columns = server.predict({"inputs": {k: [r.get(k) for r in records] for k in fields}})
    np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(rows, columns)
    # Pre-encoded ids give the same answers.
    encoded = compact.raw_encoder.encode(records)
    inputs = {name: encoded.dense[:, j].tolist() for j, name in enumerate(encoded_dense(data))}
    inputs.update(
        {
            k: [v.tolist() for v in ids] if isinstance(ids, list) else ids.tolist()
            for k, ids in encoded.sparse.items()
        }
    )
    np.testing.assert_allclose(server.predict({"ids": True, "inputs": inputs}), expected, atol=1e-6)
    # Missing fields: an empty record is every field missing (OOV ids, filled numbers).
    assert server.predict({"instances": [{}]}) == pytest.approx(
        compact.predict_records([{}]).tolist(), abs=1e-6
    )


def encoded_dense(data: Path) -> list[str]:
    return RawEncoder.load(data).meta.dense


BAD_REQUESTS = [
    # (body, content type, status, words the error must contain)
    (b'{"instances": [{"C1": "3"', "application/json", 400, "malformed JSON"),
    (b"\xff\xfe", "application/json", 400, "UTF-8"),
    (b"[1, 2]", "application/json", 400, "JSON object"),
    ({"rows": []}, "application/json", 400, "'rows'"),
    ({"instances": [{"C1": "3"}], "inputs": {}}, "application/json", 400, "exactly one"),
    ({"instances": [{"Cx": "3"}]}, "application/json", 400, "'Cx'"),
    ({"inputs": {"Cx": ["3"]}}, "application/json", 400, "'Cx'"),
    ({"instances": [{"C1": {"a": 1}}]}, "application/json", 400, "'C1'"),
    ({"instances": [{"I1": "abc"}]}, "application/json", 400, "'I1'"),
    ({"instances": ["C1"]}, "application/json", 400, "instances[0]"),
    ({"instances": {"C1": "3"}}, "application/json", 400, "'instances'"),
    ({"inputs": {"C1": "3"}}, "application/json", 400, "inputs.C1"),
    ({"inputs": {"C1": ["3", "4"], "C2": ["1"]}}, "application/json", 400, "ragged"),
    ({"instances": [{"C1": ["3"]}]}, "application/json", 400, "'C1'"),
    ({"ids": "yes", "instances": [{}]}, "application/json", 400, "'ids'"),
    ({"ids": True, "instances": [{"C1": 10**6}]}, "application/json", 400, "'C1'"),
    ({"ids": True, "instances": [{"C1": "3"}]}, "application/json", 400, "'C1'"),
    ({"instances": []}, "application/json", 400, "no rows"),
    (b'{"instances": [{"I1": NaN}]}', "application/json", 400, "NaN"),
    ({"instances": [{}] * 501}, "application/json", 413, "501 rows"),
    ({"instances": [{"C1": "x" * 200_000}]}, "application/json", 413, "limit"),
    ({"instances": [{}]}, "text/plain", 415, "application/json"),
    (b'{"instances": ' + b"[" * 40_000 + b"]" * 40_000 + b"}", "application/json", 400, "deep"),
    (b'{"inputs": {"C1": ' + b"[" * 900 + b"]" * 900 + b"}}", "application/json", 400, "C1"),
    ({"instances": [{}]}, "", 415, "application/json"),
]


def test_bad_requests_get_their_status_and_a_json_error(servers):
    server = servers["plain"]
    for body, ctype, status, words in BAD_REQUESTS:
        got, _, payload = server.request("POST", "/v1/predict", body, content_type=ctype)
        assert (got, words in payload.get("error", "")) == (status, True), (body, payload)
    assert server.request("GET", "/healthz")[0] == 200  # still alive and answering
    assert server.predict({"instances": [{}]})
    assert server.request("GET", "/v1/predict")[0] == 405


def test_concurrent_clients_get_their_own_ordered_answers_and_metrics_count(servers):
    server, data = servers["plain"], servers["data"]
    compact = CompactModel.load(servers["root"] / "plain")
    records = _records(data, 300, seed=2)
    expected = compact.predict_records(records)
    before_rows = server.metric("ctr_rows_predicted_total")
    before_ok = server.metric('ctr_requests_total{path="/v1/predict",status="200"}')
    requests = [(i % 280, i % 280 + 1 + i % 17) for i in range(64)]

    def call(span: tuple[int, int]) -> list[float]:
        return server.predict({"instances": records[span[0] : span[1]]})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, requests))
    for (a, b), answer in zip(requests, answers, strict=True):
        np.testing.assert_allclose(answer, expected[a:b], rtol=0, atol=1e-6)
    rows = sum(b - a for a, b in requests)
    assert server.metric("ctr_rows_predicted_total") - before_rows == rows
    assert server.metric('ctr_requests_total{path="/v1/predict",status="200"}') - before_ok == 64
    assert server.metric("ctr_batch_rows_count") >= 1
    assert server.metric("ctr_request_latency_seconds_count") >= 64
    assert server.metric("ctr_queue_rows") == 0
    _, _, text = server.request("GET", "/metrics")
    assert 'ctr_batch_rows_bucket{le="+Inf"}' in text


def test_a_full_queue_answers_503_with_retry_after(servers):
    server = servers["plain"]
    body = {"instances": [{"C1": str(i % 30)} for i in range(450)]}
    statuses, retry = [], set()

    def call(_: int) -> None:
        status, headers, _ = server.request("POST", "/v1/predict", body)
        statuses.append(status)
        if status == 503:
            retry.add(headers.get("retry-after"))

    with ThreadPoolExecutor(12) as pool:
        for _ in range(20):  # bounded: stop as soon as back-pressure showed
            list(pool.map(call, range(24)))
            if 503 in statuses:
                break
    assert 503 in statuses and set(statuses) <= {200, 503}
    assert retry == {"1"}


def test_metadata_and_readiness(servers):
    server = servers["plain"]
    status, _, meta = server.request("GET", "/v1/metadata")
    assert status == 200
    assert meta["model"]["name"] == "deepfm" and meta["method"] == "full"
    assert meta["hyperparameters"]["storage"] == "fp32"
    assert meta["dataset"] == "synthetic-criteo" and len(meta["checksum"]) == 64
    kinds = {f["name"]: f["kind"] for f in meta["fields"]}
    assert kinds["I1"] == "dense" and kinds["C1"] == "sparse" and "multi_hot" in kinds.values()
    # An id-keyed method serves raw values through its vocabulary: counted beside the tables.
    vocab = (servers["root"] / "plain" / "vocab.parquet").stat().st_size
    assert meta["footprint"] == {
        "tables": meta["serve_bytes"],
        "vocabulary": vocab,
        "total": meta["serve_bytes"] + vocab,
    }
    assert server.request("GET", "/readyz")[2] == {"status": "ready", "version": "plain"}


def test_hot_swap_under_load_loses_nothing_and_refuses_a_corrupt_artifact(servers):
    server, data, root = servers["versions"], servers["data"], servers["root"]
    records = _records(data, 40, seed=3)
    v1 = CompactModel.load(root / "versions" / "v1").predict_records(records)
    results: list[tuple[int, object]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            status, _, payload = server.request("POST", "/v1/predict", {"instances": records})
            results.append((status, payload))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        _export(data, root / "versions" / "v2", seed=1)  # written beside, renamed in
        v2 = CompactModel.load(root / "versions" / "v2").predict_records(records)
        deadline = time.monotonic() + 60
        while server.request("GET", "/v1/metadata")[2]["version"] != "v2":
            assert time.monotonic() < deadline, "the new version was never swapped in"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert results and all(status == 200 for status, _ in results)
    seen = set()
    for _, payload in results:
        answer = np.asarray(payload["predictions"])
        match = [np.allclose(answer, v, atol=1e-6) for v in (v1, v2)]
        assert any(match)  # every answer is wholly one model's, never a mix
        seen.add(match.index(True))
    assert seen == {0, 1}

    # A corrupt v3 appears: refused, v2 keeps serving.
    staging = root / "versions" / ".v3-staging"
    shutil.copytree(root / "versions" / "v2", staging)
    tensors = staging / "tensors.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tensors.write_bytes(bytes(raw))
    staging.rename(root / "versions" / "v3")
    deadline = time.monotonic() + 60
    while server.metric('ctr_reloads_total{result="refused"}') < 1:
        assert time.monotonic() < deadline, "the corrupt version was never considered"
        time.sleep(0.1)
    status, _, payload = server.request("POST", "/v1/reload")
    assert status == 409 and "checksum" in payload["error"] and "v2" in payload["error"]
    server.proc.send_signal(signal.SIGHUP)  # the same reload, by signal
    deadline = time.monotonic() + 60
    while server.metric('ctr_reloads_total{result="refused"}') < 3:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.1)
    assert server.request("GET", "/readyz")[2] == {"status": "ready", "version": "v2"}
    np.testing.assert_allclose(server.predict({"instances": records}), v2, atol=1e-6)


def test_a_bad_value_fails_only_its_own_request_in_a_batch(servers):
    """The batcher encodes a batch's raw requests together; a bad one is found and failed alone."""
    from ctr.serving.http.batcher import RawColumns, run_batch
    from ctr.serving.http.models import load_served
    from ctr.serving.http.requests import RequestError, Rows

    served = load_served(servers["root"] / "plain")
    records = _records(servers["data"], 30, seed=4)
    good = [
        RawColumns({k: [r.get(k) for r in part] for k in {k for r in part for k in r}}, len(part))
        for part in (records[:10], records[10:30])
    ]
    bad = RawColumns({"I1": ["abc", 1.0]}, 2)
    expected = served.model.predict_records(records)
    # Rows-form requests keep their rows until the batch builds its columns.
    rows = [
        RawColumns(Rows(part, {k for r in part for k in r}), len(part))
        for part in (records[:10], records[10:30])
    ]
    bad_rows = RawColumns(Rows([{"I1": "abc"}, {"I1": 1.0}], {"I1"}), 2)
    for items in ([good[0], bad, good[1]], [rows[0], bad_rows, rows[1]], [rows[0], bad, good[1]]):
        probs, outcome = run_batch(served, items)
        assert isinstance(outcome[1], RequestError) and "'I1'" in outcome[1].message
        np.testing.assert_allclose(probs[slice(*outcome[0])], expected[:10], atol=1e-6)
        np.testing.assert_allclose(probs[slice(*outcome[2])], expected[10:], atol=1e-6)
    probs, outcome = run_batch(served, rows)  # all good: one pass over both requests' rows
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def _keep_alive_latencies(port: int, request: bytes, count: int) -> list[float]:
    """Seconds per request of ``count`` requests on one keep-alive connection (a raw socket,
    one ``sendall`` a request, TCP_NODELAY on the client side as a ranking service sets it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies = []
    try:
        for _ in range(count + 1):  # the first one opens the connection: not counted
            start = time.perf_counter()
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536) or _closed()
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < length:
                body += sock.recv(65536) or _closed()
            latencies.append(time.perf_counter() - start)
    finally:
        sock.close()
    return latencies[1:]


def _closed() -> bytes:
    raise ConnectionError("the server closed the keep-alive connection")


def test_keep_alive_requests_do_not_stall(servers):
    """Answers on a kept-alive connection come without the ~40 ms stall of Nagle's algorithm
    meeting the client's delayed ACK (a response written as headers, then body, with Nagle
    on). /healthz does almost no work, so its p50 stays far below 40 ms even on a busy
    machine; with the stall every request after the first waits for the delayed ACK."""
    port = servers["plain"].port
    health = _keep_alive_latencies(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", 20)
    assert np.median(health) < 0.020, f"keep-alive p50 {np.median(health) * 1e3:.1f} ms"
    body = json.dumps({"instances": [{}]}).encode()
    predict = (
        b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert len(_keep_alive_latencies(port, predict, 5)) == 5  # predictions answer as well


def _worker_of(server: Server) -> str:
    """The pid of the worker that answers a new connection."""
    _, _, text = server.request("GET", "/metrics")
    return re.search(r'ctr_worker\{index="\d+",workers="\d+",pid="(\d+)"\}', text).group(1)


def _versions_everywhere(server: Server, version: str, workers: set[str]) -> bool:
    """Whether every worker in ``workers`` serves ``version`` (new connections land on the
    workers by the kernel's hash: enough of them reach each). Worker and version come from
    one /metrics answer: two requests may reach two workers."""
    seen: dict[str, str] = {}
    for _ in range(60):
        _, _, text = server.request("GET", "/metrics")
        pid = re.search(r'ctr_worker\{index="\d+",workers="\d+",pid="(\d+)"\}', text).group(1)
        seen[pid] = re.search(r'ctr_model_info\{version="([^"]*)"', text).group(1)
        if set(seen) >= workers and all(v == version for v in seen.values()):
            return True
    return False


def test_workers_share_the_port_swap_together_and_restart(tiny_data, tmp_path):
    _export(tiny_data, tmp_path / "versions" / "v1", seed=0)
    server = Server(
        tmp_path / "versions", tmp_path / "workers.log", "--workers", "2", "--poll-s", "0"
    )
    try:
        server.wait()
        records = _records(tiny_data, 20, seed=5)
        v1 = CompactModel.load(tmp_path / "versions" / "v1").predict_records(records)
        workers: set[str] = set()
        for _ in range(60):  # bounded: new connections until both workers answered
            workers.add(_worker_of(server))
            np.testing.assert_allclose(server.predict({"instances": records}), v1, atol=1e-6)
            if len(workers) == 2:
                break
        assert len(workers) == 2, "one worker took every connection"
        parent = server.proc.pid
        children = {int(p) for p in workers}

        # A reload on one worker reaches the other (through the parent).
        _export(tiny_data, tmp_path / "versions" / "v2", seed=1)
        status, _, payload = server.request("POST", "/v1/reload")
        assert status == 200 and payload["version"] == "v2", payload
        deadline = time.monotonic() + 60
        while not _versions_everywhere(server, "v2", workers):
            assert time.monotonic() < deadline, "a worker still serves v1"
        v2 = CompactModel.load(tmp_path / "versions" / "v2").predict_records(records)
        np.testing.assert_allclose(server.predict({"instances": records}), v2, atol=1e-6)

        # A worker that dies is started again and serves what the others serve.
        victim = min(children)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            current = set()
            with contextlib.suppress(OSError, http.client.HTTPException):
                current = {_worker_of(server) for _ in range(20)}
            if len(current) == 2 and str(victim) not in current:
                break
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.5)
        # The new worker starts with the model the server process loaded (v1) and reloads
        # in the background once it takes requests: it serves v2 once that load is done.
        deadline = time.monotonic() + 60
        while not _versions_everywhere(server, "v2", current):
            assert time.monotonic() < deadline, "the restarted worker still serves v1"
    finally:
        server.stop()
    gone = time.monotonic() + 15
    for pid in [*children, *(int(p) for p in current)]:
        while _alive(pid) and time.monotonic() < gone:
            time.sleep(0.1)
        assert not _alive(pid), f"worker {pid} outlived the server (parent {parent})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


class _Transport:
    """A fake transport recording its writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_an_answer_is_one_write():
    """uvicorn writes an answer's head, then its body: the transport sends them in one write
    (one send, one segment); a head nothing follows goes out at the loop's next iteration,
    and before a close. Without the holding, the head and body are two writes."""
    from ctr.serving.http.app import OneSend

    loop = asyncio.new_event_loop()
    try:
        raw = _Transport()
        transport = OneSend(raw, loop)
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        transport.write(head)
        transport.write(b"{}")
        assert raw.writes == [head + b"{}"]
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # nothing follows it
        assert len(raw.writes) == 1
        loop.run_until_complete(asyncio.sleep(0))
        assert raw.writes[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
        transport.write(head)
        transport.writelines([b"{", b"}"])
        assert raw.writes[-1] == head + b"{}"
        transport.write(head)
        transport.close()
        assert raw.writes[-1] == head and raw.closed
        assert transport.get_extra_info("peername") == "info:peername"
    finally:
        loop.close()
