"""The serving section's load generator, run in its own process so the clients' work does
not share an interpreter with the server or the in-process figures: a spec (JSON) on stdin,
its figures (JSON) on stdout. ``python -m bench.loadgen`` (or ``python bench.py --loadgen``).

Each client is an asyncio protocol on its own keep-alive connection (no stream objects and
no timeout wrapper a request: the load generator shares the server's cores, so what it
spends a request is taken from the server), on uvloop where it is installed.

After a warm-up, the figures are measured in ``spec["windows"]`` windows of ``spec["seconds"]``
each: the result is each figure's median over the windows, with every window kept. Each window
also says what else ran meanwhile (:class:`Usage`: the machine's busy cores from
``/proc/stat`` less the server's (``spec["watch_pids"]``) and the load generator's own CPU
time) and flags itself disturbed past :data:`DISTURBED_CORES`; a disturbed window is kept and
counted, never dropped."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Sequence

import numpy as np

#: a request unanswered this long is an error (its connection is closed and opened again)
TIMEOUT_S = 10.0
#: a window is disturbed when other processes used more than this many cores during it
DISTURBED_CORES = 0.25
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Usage:
    """A reading of what the machine's CPUs did so far: busy time of all CPUs, CPU time of the
    watched processes (all their threads), their threads' time waiting for a CPU (run-queue
    delay, from ``schedstat``), this process's CPU time, and the load average. Linux only; on
    other systems (or where a file is missing) the figures read as 0."""

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.time = time.perf_counter()
        self.busy = _busy_seconds()
        self.own = time.process_time()
        self.watched, self.wait = 0.0, 0.0
        for pid in pids:
            cpu, wait = _process_seconds(pid)
            self.watched += cpu
            self.wait += wait
        self.loadavg = _loadavg()

    def since(self, before: Usage) -> dict:
        """Per second of wall time between ``before`` and this reading: cores busy on the
        machine, used by the watched processes, by this process, and by everything else;
        the watched threads' run-queue wait (ms a second); the load average at both ends."""
        wall = max(self.time - before.time, 1e-9)
        busy = (self.busy - before.busy) / wall
        watched = (self.watched - before.watched) / wall
        own = (self.own - before.own) / wall
        other = busy - watched - own
        return {
            "machine cores": busy,
            "server cores": watched,
            "loadgen cores": own,
            "other cores": other,
            "server runq ms/s": (self.wait - before.wait) / wall * 1e3,
            "loadavg": f"{before.loadavg:.2f}-{self.loadavg:.2f}",
            "disturbed": other > DISTURBED_CORES,
        }


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _busy_seconds() -> float:
    """Busy CPU time of the whole machine (``/proc/stat``: all but idle and iowait)."""
    fields = _read("/proc/stat").split("\n", 1)[0].split()[1:9]
    if len(fields) < 8:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields)
    return (user + nice + system + irq + softirq + steal) / _TICK


def _process_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds, seconds its threads waited for a CPU) of a process so far."""
    stat = _read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    cpu = (int(stat[11]) + int(stat[12])) / _TICK if len(stat) > 12 else 0.0
    wait = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = []
    for task in tasks:
        fields = _read(f"/proc/{pid}/task/{task}/schedstat").split()
        if len(fields) > 1:
            wait += int(fields[1]) / 1e9
    return cpu, wait


def _loadavg() -> float:
    fields = _read("/proc/loadavg").split()
    return float(fields[0]) if fields else 0.0


def _http_request(body: bytes) -> bytes:
    return (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class _Run:
    """What the clients share: the requests, the phase's deadline and budget, the figures."""

    def __init__(self, spec: dict) -> None:
        self.requests = [_http_request(b.encode()) for b in spec["bodies"]]
        self.port = spec["port"]
        self.deadline = 0.0
        self.budget = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.clients: dict[int, _Client] = {}  # slot -> its current connection

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _Client(asyncio.Protocol):
    """One keep-alive connection sending its next request as soon as the answer came."""

    def __init__(self, run: _Run, slot: int, done: asyncio.Future) -> None:
        self.run = run
        self.slot = slot
        self.index = slot  # the next body, round robin
        self.done = done
        run.clients[slot] = self
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.start = 0.0  # of the request in flight; 0.0: none

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send()

    def send(self) -> None:
        run = self.run
        if time.perf_counter() >= run.deadline or run.budget <= 0:
            self.start = 0.0
            if not self.done.done():
                self.done.set_result(None)
            return
        run.budget -= 1
        self.start = time.perf_counter()
        self.transport.write(run.requests[self.index % len(run.requests)])  # type: ignore[union-attr]
        self.index += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        try:
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        except (IndexError, ValueError):
            self.fail("ValueError")
            return
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        if head[9:12] == b"200":
            self.run.latencies.append(time.perf_counter() - self.start)
        else:
            self.run.error(head[9:12].decode())
        self.send()

    def fail(self, kind: str) -> None:
        """An error: the connection is closed; the client connects again and goes on."""
        self.run.error(kind)
        self.start = 0.0
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.done.done():
            if exc is not None or self.start:
                self.run.error(type(exc).__name__ if exc else "ConnectionClosed")
            asyncio.get_running_loop().create_task(_connect(self.run, self.slot, self.done))


async def _connect(run: _Run, slot: int, done: asyncio.Future) -> None:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: _Client(run, slot, done), "127.0.0.1", run.port),
            TIMEOUT_S,
        )
    except (TimeoutError, OSError) as e:
        run.error(type(e).__name__)
        if time.perf_counter() < run.deadline:
            await asyncio.sleep(0.1)
            await _connect(run, slot, done)
        elif not done.done():
            done.set_result(None)


async def _phase(run: _Run, slots: int, seconds: float, budget: int) -> None:
    """Every client sends until ``seconds`` pass or ``budget`` requests went out; a request
    in flight longer than :data:`TIMEOUT_S` fails its connection."""
    loop = asyncio.get_running_loop()
    run.deadline = time.perf_counter() + seconds
    run.budget = budget
    dones = [loop.create_future() for _ in range(slots)]
    for slot in range(slots):
        client = run.clients.get(slot)
        if client is not None and client.transport is not None:
            client.done = dones[slot]
            client.send()
        else:
            loop.create_task(_connect(run, slot, dones[slot]))
    pending = set(dones)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.5)
        now = time.perf_counter()
        for client in list(run.clients.values()):
            if client.transport is not None and client.start and now - client.start > TIMEOUT_S:
                client.fail("TimeoutError")


async def load_clients(spec: dict) -> dict:
    """``spec["clients"]`` keep-alive connections to 127.0.0.1, each sending the next of
    ``spec["bodies"]`` as soon as its answer came (closed loop). A warm-up of
    ``spec["warmup_s"]`` on the same connections comes first, not counted; then
    ``spec.get("windows", 1)`` windows of ``spec["seconds"]`` (or ``spec["max_requests"]``
    requests, whichever ends first) are measured. A request over 10 s is an error.

    Returns each figure's median over the windows, ``"windows"``: every window's figures
    and its :class:`Usage` (``spec.get("watch_pids")``: the server's processes), and
    ``"disturbed windows"``: how many were."""
    run = _Run(spec)
    slots = spec["clients"]
    pids = spec.get("watch_pids", [])
    # Connect (nothing sent: no budget yet), warm up (the server's memo of the bodies'
    # values), then the measured windows.
    await _phase(run, slots, TIMEOUT_S, 0)
    await _phase(run, slots, spec["warmup_s"], spec["max_requests"])
    windows = []
    for _ in range(spec.get("windows", 1)):
        run.latencies.clear()
        run.errors.clear()
        before = Usage(pids)
        await _phase(run, slots, spec["seconds"], spec["max_requests"])
        usage = Usage(pids).since(before)
        elapsed = time.perf_counter() - before.time
        windows.append({**_figures(run, spec["rows"], elapsed), **usage})
    for client in run.clients.values():
        if client.transport is not None:
            client.transport.close()
    keys = ("requests/s", "rows/s", "p50_ms", "p99_ms", "p999_ms", "errors")
    result = {k: float(np.median([w[k] for w in windows])) for k in keys}
    result["errors"] = sum(w["errors"] for w in windows)  # every error counts, not a median
    result["error kinds"] = (
        ",".join(sorted({w["error kinds"] for w in windows if w["error kinds"] != "-"})) or "-"
    )
    result["disturbed windows"] = sum(w["disturbed"] for w in windows)
    result["windows"] = windows
    return result


def _figures(run: _Run, rows: int, elapsed: float) -> dict:
    done = len(run.latencies)
    q = [float(x) * 1e3 for x in percentiles(run.latencies, (50, 99, 99.9))]
    return {
        "requests/s": done / elapsed,
        "rows/s": done * rows / elapsed,
        "p50_ms": q[0],
        "p99_ms": q[1],
        "p999_ms": q[2],
        "errors": sum(run.errors.values()),
        "error kinds": ",".join(f"{k}:{v}" for k, v in sorted(run.errors.items())) or "-",
    }


def percentiles(values: list[float], qs: Sequence[float]) -> list[float]:
    return list(np.percentile(values, qs)) if values else [float("nan")] * len(qs)


def main() -> int:
    spec = json.loads(sys.stdin.read())
    try:
        import uvloop

        result = uvloop.run(load_clients(spec))
    except ImportError:
        result = asyncio.run(load_clients(spec))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
