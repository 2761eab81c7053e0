"""The serving section's load generator, run in its own process so the clients' work does
not share an interpreter with the server or the in-process figures: a spec (JSON) on stdin,
its figures (JSON) on stdout. ``python -m bench.loadgen`` (or ``python bench.py --loadgen``)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import Sequence

import numpy as np


def _http_request(body: bytes) -> bytes:
    return (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


async def load_clients(spec: dict) -> dict:
    """``spec["clients"]`` keep-alive connections to 127.0.0.1, each sending the next of
    ``spec["bodies"]`` as soon as its answer came (closed loop), for ``spec["seconds"]`` or
    ``spec["max_requests"]`` in all, whichever ends first; a request over 10 s is an error."""
    requests = [_http_request(b.encode()) for b in spec["bodies"]]
    rows = spec["rows"]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    budget = [spec["max_requests"]]

    async def client(k: int, deadline: float) -> None:
        conn = None
        i = k
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            start = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", spec["port"]), 10
                    )
                    conn[1].get_extra_info("socket").setsockopt(
                        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                    )
                reader, writer = conn
                writer.write(requests[i % len(requests)])
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await asyncio.wait_for(reader.readexactly(length), 10)
                status = head[9:12].decode()
                if status != "200":
                    errors[status] = errors.get(status, 0) + 1
                    continue
                latencies.append(time.perf_counter() - start)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                if conn is not None:
                    conn[1].close()
                conn = None
            finally:
                i += 1
        if conn is not None:
            conn[1].close()

    # Warm-up (connections, the server's memo of the bodies' values), then the measured run.
    warm = time.perf_counter() + spec["warmup_s"]
    await asyncio.gather(*(client(k, warm) for k in range(spec["clients"])))
    latencies.clear()
    errors.clear()
    budget[0] = spec["max_requests"]
    started = time.perf_counter()
    end = started + spec["seconds"]
    await asyncio.gather(*(client(k, end) for k in range(spec["clients"])))
    elapsed = time.perf_counter() - started
    done = len(latencies)
    q = [float(x) * 1e3 for x in percentiles(latencies, (50, 99, 99.9))]
    return {
        "requests/s": done / elapsed,
        "rows/s": done * rows / elapsed,
        "p50_ms": q[0],
        "p99_ms": q[1],
        "p999_ms": q[2],
        "errors": sum(errors.values()),
        "error kinds": ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "-",
    }


def percentiles(values: list[float], qs: Sequence[float]) -> list[float]:
    return list(np.percentile(values, qs)) if values else [float("nan")] * len(qs)


def main() -> int:
    print(json.dumps(asyncio.run(load_clients(json.loads(sys.stdin.read())))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
