"""The server's counters in Prometheus' text exposition format (``GET /metrics``).

Requests by path and status, latency and batch-size histograms, rows predicted, queue depth,
reloads by result, the served artifact's version and checksum, and (under ``--workers``) the
worker that answered: each worker counts its own.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctr.serving.http.models import Served

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = tuple(2**k for k in range(17))


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # the first bucket whose bound is >= value (past the last: the +Inf count)
        self.counts[bisect_left(self.buckets, value)] += 1
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
