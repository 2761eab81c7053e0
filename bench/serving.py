"""The ``serving`` section: ``ctr serve`` under keep-alive load from its own process against
in-process ``CompactModel`` calls, the rows and columns request forms, and the lookup speed
of the binary, codebook and pruned-index serving modules against fp32 tables."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchrec import KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from bench.common import CACHE, ROOT, default_dataset, print_table
from bench.loadgen import DISTURBED_CORES, Usage
from bench.lookups import (
    binary_tables,
    codebook_tables,
    int_tables,
    lookup_rates,
    pruned_index_tables,
)
from ctr import CompactModel, EmbeddingLayer, build_model, export
from ctr.embedding import features_from_dataset
from datasets.encode import RawEncoder
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta

SERVING_ROWS = 200_000
# (clients, rows per request): one caller, a few callers with small batches, many callers.
SERVING_LOADS = ((1, 1), (16, 8), (64, 8))


def _child_env() -> dict[str, str]:
    """The environment of the server and the load generator: this repository importable."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run_load(spec: dict) -> dict:
    """The load generator in its own process (:mod:`bench.loadgen`): the clients' work does
    not share this process's interpreter with the in-process figures."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        env=_child_env(),
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=spec["seconds"] + spec["warmup_s"] + 120,
    )
    if proc.returncode:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _start_server(path: Path, *args: str) -> tuple[object, int]:
    """``ctr serve path --port 0 ARGS`` on 127.0.0.1 -> (process, port) once it answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctr.cli", "serve", str(path), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_child_env(),
    )
    port, deadline = 0, time.monotonic() + 300
    while not port and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            found = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
            port = int(found.group(1)) if found else 0
    if not port:
        _stop_server(proc)
        raise RuntimeError("the server did not start")
    return proc, port


def _server_pids(proc: object) -> list[int]:
    """The server process and its workers (its children, where ``/proc`` lists them)."""
    pids = [proc.pid]
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    return pids + [int(c) for c in children]


def _stop_server(proc: object) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _batch_rows(port: int, workers: int) -> dict[str, tuple[float, float]]:
    """Worker pid -> (sum, count) of rows per forward, from /metrics on new connections until
    every worker answered (the kernel spreads connections over them; at most 64 tries)."""
    seen: dict[str, tuple[float, float]] = {}
    for _ in range(64):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        values = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("ctr_batch_rows_")
        )
        pid = re.search(r'ctr_worker\{[^}]*pid="(\d+)"', text)
        seen[pid.group(1) if pid else "-"] = (
            float(values["ctr_batch_rows_sum"]),
            float(values["ctr_batch_rows_count"]),
        )
        if len(seen) >= workers:
            break
    return seen


def _mean_batch(before: dict, after: dict) -> float:
    """Rows per forward over all workers between two :func:`_batch_rows` readings."""
    rows = sum(a[0] - before.get(pid, (0.0, 0.0))[0] for pid, a in after.items())
    forwards = sum(a[1] - before.get(pid, (0.0, 0.0))[1] for pid, a in after.items())
    return rows / max(forwards, 1)


def _setting_usage(windows: list[dict]) -> dict:
    """A setting's share of the machine over its windows: medians of the server's, the load
    generator's and the other processes' cores, the server's run-queue wait, the load
    average from the first window's start to the last one's end, and the rows/s of each
    window (so a swing between windows shows in the table)."""
    return {
        "server cores": float(np.median([w["server cores"] for w in windows])),
        "loadgen cores": float(np.median([w["loadgen cores"] for w in windows])),
        "other cores": float(np.median([w["other cores"] for w in windows])),
        "server runq ms/s": float(np.median([w["server runq ms/s"] for w in windows])),
        "loadavg": f"{windows[0]['loadavg'].split('-')[0]}-{windows[-1]['loadavg'].split('-')[1]}",
        "rows/s windows": "/".join(f"{w['rows/s']:.0f}" for w in windows),
    }


def _first_rows(batch: object, n: int) -> tuple[object, object]:
    """(dense, KJT) of the first ``n`` rows of a loader batch (single-hot or multi-hot)."""
    kjt = batch.sparse_features
    per_key = kjt.to_dict()
    return batch.dense_features[:n], KeyedJaggedTensor.from_jt_dict(
        {k: _jt_rows(jt, n) for k, jt in per_key.items()}
    )


def _jt_rows(jt: object, n: int) -> object:
    lengths = jt.lengths()[:n]
    return JaggedTensor(values=jt.values()[: int(lengths.sum())], lengths=lengths)


def bench_serving(args: argparse.Namespace) -> dict:
    """`ctr serve` under keep-alive load (its own process) vs in-process CompactModel."""

    torch.set_num_threads(1)
    data = default_dataset(args, rows=args.rows or SERVING_ROWS)
    meta = DatasetMeta.load(data)
    encoder = RawEncoder.load(data)
    rng = np.random.default_rng(0)
    # Each setting: a warm-up on the same connections, then several windows; the figures are
    # each one's median over the windows, every window kept in the JSON with what else ran.
    seconds = float(os.environ.get("CTR_BENCH_SERVING_S", "2"))
    windows = int(os.environ.get("CTR_BENCH_SERVING_WINDOWS", "3"))
    warmup_s = float(os.environ.get("CTR_BENCH_SERVING_WARMUP_S", "1.5"))
    worker_counts = [int(w) for w in os.environ.get("CTR_BENCH_SERVING_WORKERS", "1,2").split(",")]

    def raw_records(n: int) -> list[dict]:
        cols: dict[str, list] = {d: rng.normal(size=n).round(3).tolist() for d in meta.dense}
        for f in meta.sparse:
            values = encoder.vocabs[f.name].values
            picks = values.take(rng.integers(0, len(values), n)).to_pylist()
            cols[f.name] = [[v] for v in picks] if f.multi_hot else picks
        return [{k: v[i] for k, v in cols.items()} for i in range(n)]

    # 64 distinct request bodies per size, sent round robin (rows form, as a ranking service).
    bodies = {
        rows: [json.dumps({"instances": raw_records(rows)}) for _ in range(64)]
        for rows in sorted({r for _, r in SERVING_LOADS})
    }
    ids_batches = [
        b for _, b in zip(range(4), BatchLoader(meta, "test", 4096).epoch(0), strict=False)
    ]

    def best_rate(fn: Callable[[], int], repeats: int) -> tuple[float, float]:
        """(rows/s of the best run, p50 seconds of a call) over ``repeats`` calls."""
        fn()
        times, n = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - start)
        return n / min(times), float(np.median(times))

    http_rows, inproc_rows, forms_rows, machine = [], [], [], []
    for storage in ("fp32", "int8"):
        torch.manual_seed(0)
        layer = EmbeddingLayer(features_from_dataset(meta), 16, "full", "1x", storage=storage)
        model = build_model("deepfm", layer, len(meta.dense)).eval()
        path = CACHE / "serving" / storage
        export(model, path, dataset=data, overwrite=True)  # its own cache
        compact = CompactModel.load(path)
        coalesced: dict[tuple[int, int, int], float] = {}  # (workers, clients, rows)
        for workers in worker_counts:
            proc, port = _start_server(path, "--workers", str(workers))
            pids = _server_pids(proc)
            try:
                for clients, rows in SERVING_LOADS:
                    before = _batch_rows(port, workers)
                    spec = {
                        "port": port,
                        "bodies": bodies[rows],
                        "rows": rows,
                        "clients": clients,
                        "seconds": seconds,
                        "warmup_s": warmup_s,
                        "windows": windows,
                        "watch_pids": pids,
                        "max_requests": 200_000,
                    }
                    load = _run_load(spec)
                    coalesced[workers, clients, rows] = _mean_batch(
                        before, _batch_rows(port, workers)
                    )
                    # The in-process reference at this batch, measured right after the
                    # setting (the server idle): the machine's state drifts over a run,
                    # and the table below is measured after every server has stopped.
                    batch = max(1, round(coalesced[workers, clients, rows]))
                    records = raw_records(batch)
                    adjacent, adjacent_p50 = best_rate(
                        lambda m=compact, r=records: len(m.predict_records(r)),
                        max(5, min(200, 20_000 // batch)),
                    )
                    http_rows.append(
                        {
                            "storage": storage,
                            "workers": workers,
                            "clients x rows": f"{clients} x {rows}",
                            **load,
                            "batch rows": coalesced[workers, clients, rows],
                            "in-process @ batch, adjacent": adjacent,
                            "vs adjacent": load["rows/s"] / adjacent,
                            # against the median call's rate (the server's figure is a
                            # median too; the headline ratio is against the best call)
                            "vs adjacent median": load["rows/s"] * adjacent_p50 / batch,
                            **_setting_usage(load["windows"]),
                        }
                    )
            finally:
                _stop_server(proc)

        # In process, at the same batch sizes: raw records (encode + forward) and ids.
        inproc_before = Usage()
        sizes = sorted({1, 8, *(max(1, round(b)) for b in coalesced.values())})
        for n in sizes:
            records = raw_records(n)
            batch = ids_batches[0]
            kjt_n = _first_rows(batch, n)

            def on_records(r: list = records, m: object = compact) -> int:
                return len(m.predict_records(r))

            def on_ids(b: tuple = kjt_n, m: object = compact, n: int = n) -> int:
                with torch.inference_mode():
                    m(*b)
                return n

            repeats = max(5, min(200, 20_000 // n))
            rec_rate, rec_p50 = best_rate(on_records, repeats)
            ids_rate, ids_p50 = best_rate(on_ids, repeats)
            inproc_rows.append(
                {
                    "storage": storage,
                    "rows/call": n,
                    "predict_records rows/s": rec_rate,
                    "predict_records p50_ms": rec_p50 * 1e3,
                    "predict (ids) rows/s": ids_rate,
                    "predict (ids) p50_ms": ids_p50 * 1e3,
                }
            )
        # Cold: one row of values never seen (every call misses the encoder's memo).
        cold = [raw_records(1) for _ in range(30)]
        rate_cold, p50_cold = best_rate(
            lambda m=compact, c=cold: len(m.predict_records(c.pop())), 25
        )
        inproc_rows.append(
            {
                "storage": storage,
                "rows/call": "1 (new values)",
                "predict_records rows/s": rate_cold,
                "predict_records p50_ms": p50_cold * 1e3,
            }
        )
        # One never-seen categorical value in an otherwise memoised row: what a new value
        # costs by itself (its own column's transform).
        warm = raw_records(1)[0]
        compact.predict_records([warm])
        field = next(f.name for f in meta.sparse if not f.multi_hot)
        one_new = [dict(warm, **{field: f"never-seen-{storage}-{i}"}) for i in range(30)]
        rate_one, p50_one = best_rate(
            lambda m=compact, c=one_new: len(m.predict_records([c.pop()])), 25
        )
        inproc_rows.append(
            {
                "storage": storage,
                "rows/call": "1 (one new value)",
                "predict_records rows/s": rate_one,
                "predict_records p50_ms": p50_one * 1e3,
            }
        )
        machine.append({"storage": storage, "in process": Usage().since(inproc_before)})
        for row in http_rows:
            if row["storage"] == storage:
                b = row["batch rows"]
                ref = next(
                    r
                    for r in inproc_rows
                    if r["storage"] == storage and r["rows/call"] == max(1, round(b))
                )
                row["vs in-process records @ batch"] = row["rows/s"] / ref["predict_records rows/s"]
        # The rows form against the columns form, 10k rows (interleaved, best of 3).
        big = raw_records(10_000)
        columns = {k: [r.get(k) for r in big] for k in encoder.fields}
        times = {"rows": [], "columns": []}
        for _ in range(3):
            for form, fn in (
                ("rows", lambda m=compact, r=big: m.predict_records(r)),
                ("columns", lambda m=compact, c=columns: m.predict_columns(c)),
            ):
                start = time.perf_counter()
                fn()
                times[form].append(time.perf_counter() - start)
        forms_rows.append(
            {
                "storage": storage,
                "rows form s": min(times["rows"]),
                "columns form s": min(times["columns"]),
                "rows / columns": min(times["rows"]) / min(times["columns"]),
            }
        )
    print_table(
        f"serving: ctr serve on 127.0.0.1, keep-alive clients in their own process, rows form; "
        f"medians of {windows} windows of {seconds:g} s after {warmup_s:g} s of warm-up; "
        f"'other cores': CPU used meanwhile by processes other than the server and the load "
        f"generator (median; a window over {DISTURBED_CORES} is disturbed: kept, counted)",
        [{k: v for k, v in r.items() if k != "windows"} for r in http_rows],
    )
    print_table("serving: in-process CompactModel at the same batch sizes (1 thread)", inproc_rows)
    print_table(
        "serving: what else ran during the in-process figures (cores; the bench's own "
        "process is 'loadgen cores' here)",
        [{"storage": m["storage"], **m["in process"]} for m in machine],
    )
    print_table("serving: rows form vs columns form, 10k rows in process", forms_rows)

    # Binary serving vs fp32 lookups, b=1 and b=2 side by side: the fast decode ("auto": one
    # kernel lookup an id), every plane its own int-N row ("planes", exact, b lookups an id),
    # and the default, the packed bits decoded in torch ("bits", the artifact's bytes).
    cards = [f.cardinality for f in meta.sparse]
    decodes = (("auto", "int2"), ("planes", "int2"), ("planes", "int8"), ("bits", "int2"))
    modules = {
        **int_tables(cards, 16, 0, ("fp32",)),
        **binary_tables(cards, 16, (1, 2), 0, decodes),
    }
    kjts = [b.sparse_features for b in ids_batches]
    speeds = lookup_rates(modules, kjts)
    rows_total = sum(cards)
    binary_rows = [
        {
            "format": k,
            "lookups/s": v,
            "vs fp32": v / speeds["fp32"],
            # What each format holds in memory per id (fp32: 16 floats).
            "resident B/row": getattr(modules[k], "resident_bytes", rows_total * 64) / rows_total,
        }
        for k, v in speeds.items()
    ]
    print_table(
        "serving: binary decode vs fp32 fbgemm lookups (1 thread CPU time, best of 5 per batch)",
        binary_rows,
    )

    # Codebook rows (dpq/mgqe): codes gathered, then their sub-vectors, vs fp32 rows.
    modules = {**int_tables(cards, 16, 0, ("fp32",)), **codebook_tables(cards, 16)}
    speeds = lookup_rates(modules, kjts)
    codebook_rows = [
        {
            "format": k,
            "lookups/s": v,
            "vs fp32": v / speeds["fp32"],
            "serve B/row": getattr(modules[k], "serve_bytes", rows_total * 64) / rows_total,
            "resident B/row": getattr(modules[k], "resident_bytes", rows_total * 64) / rows_total,
        }
        for k, v in speeds.items()
    ]
    print_table(
        "serving: codebook (dpq/mgqe) vs fp32 fbgemm lookups (1 thread CPU time, best of 5)",
        codebook_rows,
    )

    # Pruned rows: the same kept rows (10% of each field) behind an id -> row array and
    # behind a rank bitmap (what the export picks when it is smaller), vs the whole table.
    modules = pruned_index_tables(cards, 16, keep=0.1)
    speeds = lookup_rates(modules, kjts)
    pruned_rows = [
        {
            "format": k,
            "lookups/s": v,
            "vs pruned array": v / speeds["pruned array"],
            "vs fp32 full": v / speeds["fp32"],
            "index B/id": getattr(modules[k], "index_bytes", 0) / rows_total,
        }
        for k, v in speeds.items()
    ]
    print_table(
        "serving: pruned rows' index, id -> row array vs rank bitmap (10% of rows kept; 1 "
        "thread CPU time, best of 5 per batch)",
        pruned_rows,
    )
    return {
        "http": http_rows,
        "in_process": inproc_rows,
        "in_process_machine": machine,
        "forms": forms_rows,
        "binary": binary_rows,
        "pruned_index": pruned_rows,
        "codebook": codebook_rows,
    }
