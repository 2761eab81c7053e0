"""The ``preprocess`` section: a Criteo-format TSV through ``prepare criteo`` in a fresh
process per size: rows/s, CPU seconds and peak RSS, and how they grow with the input; then
the smaller file with ``--workers`` 1 and N (N = ``bench.py --workers``, at least 2),
interleaved, for the rows/s ratio of N workers to one."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from bench.common import CACHE, print_table
from datasets.io import atomic_write
from datasets.readers.criteo import CRITEO_COLUMNS
from datasets.synthetic import CRITEO_KAGGLE_CARDINALITIES, splitmix64


def _write_criteo_tsv(path: Path, rows: int, seed: int = 0, chunk: int = 1 << 19) -> None:
    """A Criteo-format TSV with Kaggle-sized Zipf vocabularies, written column-wise by Arrow."""
    # Share of missing values per categorical field, cycling; a few Criteo fields are mostly empty.
    missing = (
        0.0,
        0.0,
        0.03,
        0.03,
        0.0,
        0.1,
        0.0,
        0.0,
        0.0,
        0.03,
        0.0,
        0.03,
        0.0,
        0.0,
        0.0,
        0.03,
        0.0,
        0.0,
        0.44,
        0.44,
        0.03,
        0.0,
        0.0,
        0.03,
        0.44,
        0.03,
    )
    hex_digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    options = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")

    def write(tmp: Path) -> None:
        with pcsv.CSVWriter(tmp, _criteo_bench_schema(), write_options=options) as writer:
            for index, start in enumerate(range(0, rows, chunk)):
                n = min(chunk, rows - start)
                rng = np.random.default_rng([seed, index])
                cols = [pa.array((rng.random(n) < 0.25).astype(np.int64)).cast(pa.string())]
                for d in range(13):
                    x = np.floor(np.exp(rng.normal(1.0 + 0.2 * d, 1.5, n))).astype(np.int64)
                    if d == 1:  # I2 holds small negatives in the real data
                        x -= 3 * (rng.random(n) < 0.1)
                    cols.append(pa.array(x, mask=rng.random(n) < 0.2).cast(pa.string()))
                for f, size in enumerate(CRITEO_KAGGLE_CARDINALITIES):
                    ranks = _zipf_ranks(rng, size, 1.05, n).astype(np.uint64)
                    ids = splitmix64(ranks ^ np.uint64(f << 40)) & np.uint64(0xFFFFFFFF)
                    nibbles = (
                        ids[:, None] >> (np.arange(28, -1, -4, dtype=np.uint64))
                    ) & np.uint64(15)
                    data = pa.py_buffer(hex_digits[nibbles.astype(np.int64)].tobytes())
                    offsets = pa.py_buffer(np.arange(0, 8 * n + 1, 8, dtype=np.int32).tobytes())
                    valid = pa.array(rng.random(n) >= missing[f]).buffers()[1]
                    cols.append(pa.StringArray.from_buffers(n, offsets, data, valid))
                writer.write_table(pa.Table.from_arrays(cols, schema=_criteo_bench_schema()))

    atomic_write(path, write)


def _zipf_ranks(rng: np.random.Generator, n: int, a: float, size: int) -> np.ndarray:
    """Ranks in [0, n) with P(rank = r) ≈ ∝ (r+1)^-a, by inverting the continuous CDF (the
    same draw as the synthetic generator's)."""
    u = rng.random(size)
    top = (n + 1.0) ** (1.0 - a)
    x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - a))
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


def _criteo_bench_schema() -> pa.Schema:
    return pa.schema([(c, pa.string()) for c in CRITEO_COLUMNS])


_PREPARE_CHILD = """
import json, sys, time
from datasets.prepare import PrepareOptions
from datasets.readers.criteo import prepare_criteo
start = time.perf_counter()
workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
options = PrepareOptions(overwrite=True, progress=False, workers=workers)
meta = prepare_criteo([sys.argv[1]], sys.argv[2], options=options)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "rows": sum(meta.rows(s) for s in meta.splits),
                  "kept_ids": sum(f.cardinality for f in meta.sparse),
                  "distinct": sum(meta.extra["raw_distinct_train_values"].values())}))
"""


def _run_child(code: str, *args: str) -> tuple[dict, float, float]:
    """Runs ``code`` in a fresh interpreter: its JSON output line, its own peak RSS (MB) and
    its CPU seconds (user + system; a fair figure when other work shares the cores).

    The peak is the child's ``VmHWM`` read just before it exits: the ``ru_maxrss`` that
    ``wait4`` reports keeps the parent's high-water mark across fork and exec on Linux.
    """
    wrapped = code + _REPORT_PEAK
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapped, *args], stdout=subprocess.PIPE, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"child failed with exit code {proc.returncode}")
    lines = out.strip().splitlines()
    result = json.loads(lines[-2]) if len(lines) > 1 else {}
    peak_mb = json.loads(lines[-1])["peak_kb"] / 1024
    return result, peak_mb, usage.ru_utime + usage.ru_stime


_REPORT_PEAK = """
import json as _json
with open("/proc/self/status") as _status:
    _peak = next(int(x.split()[1]) for x in _status if x.startswith("VmHWM:"))
print(_json.dumps({"peak_kb": _peak}))
"""


def bench_preprocess(args: argparse.Namespace) -> dict:
    """Criteo-format TSV of 1M and 4M rows through `prepare criteo`: rows/s and peak RSS."""
    sizes = [args.rows, 4 * args.rows] if args.rows else [1_000_000, 4_000_000]
    # What importing costs (torch, pyarrow, ...) is measured apart and taken out of cpu_s.
    _, baseline, import_cpu = _run_child("import datasets.prepare; print('{}')")
    rows = []
    for n in sizes:
        path = CACHE / "preprocess" / f"criteo-{n}.tsv"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            _write_criteo_tsv(path, n)
            print(
                f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) "
                f"in {time.perf_counter() - start:.0f} s"
            )
        out = CACHE / "preprocess" / f"out-{n}"
        result, rss, cpu = _run_child(_PREPARE_CHILD, str(path), str(out))
        cpu = max(cpu - import_cpu, 1e-3)
        rows.append(
            {
                "rows": n,
                "file_MB": round(path.stat().st_size / 1e6),
                "seconds": round(result["seconds"], 1),
                "rows_per_s": round(n / result["seconds"]),
                "cpu_s": round(cpu, 1),
                "rows_per_cpu_s": round(n / cpu),
                "peak_rss_MB": round(rss),
                "distinct_train_values": result["distinct"],
                "kept_ids(min_count=10)": result["kept_ids"],
            }
        )
    big, small = rows[-1], rows[0]
    ratios = {
        "rss_ratio": round(big["peak_rss_MB"] / small["peak_rss_MB"], 2),
        "rss_above_import_ratio": round(
            (big["peak_rss_MB"] - baseline) / max(small["peak_rss_MB"] - baseline, 1), 2
        ),
        "distinct_values_ratio": round(
            big["distinct_train_values"] / small["distinct_train_values"], 2
        ),
        "import_baseline_rss_MB": round(baseline),
    }
    print_table("preprocess: prepare criteo (days split, min_count 10), one process per run", rows)
    print_table("preprocess: growth from the smaller to the larger run", [ratios])
    scaling = _worker_scaling(CACHE / "preprocess" / f"criteo-{sizes[0]}.tsv", sizes[0], args)
    return {"runs": rows, **ratios, "workers": scaling}


def _worker_scaling(path: Path, n: int, args: argparse.Namespace, rounds: int = 2) -> dict:
    """``--workers`` 1 and N on the same file, alternating (1, N, 1, N, ...) so that load from
    other work on the machine falls on both alike; the ratio is the median of each round's.

    Also the CPU ratio (one worker's CPU seconds over N's, workers included): the parallel
    efficiency. Where the kernel groups CPU time by session (``sched_autogroup_enabled``, as
    on a shared development machine) one command's processes share one session's slice
    however many they are, so the wall ratio there measures overhead, not scaling; the CPU
    ratio times N is what an otherwise idle machine of N cores would give at most."""
    workers = max(2, getattr(args, "workers", 1) or 1)
    runs, ratios, cpu_ratios = [], [], []
    for r in range(rounds):
        seconds, cpus = {}, {}
        for w in (1, workers):
            out = CACHE / "preprocess" / f"out-{n}-w{w}"
            result, rss, cpu = _run_child(_PREPARE_CHILD, str(path), str(out), str(w))
            seconds[w], cpus[w] = result["seconds"], cpu
            runs.append(
                {
                    "round": r,
                    "workers": w,
                    "seconds": round(result["seconds"], 1),
                    "rows_per_s": round(n / result["seconds"]),
                    "cpu_s(incl. workers)": round(cpu, 1),
                    "driver_peak_rss_MB": round(rss),
                }
            )
        ratios.append(seconds[1] / seconds[workers])
        cpu_ratios.append(cpus[1] / cpus[workers])
        same = _same_ids(CACHE / "preprocess" / f"out-{n}-w1", out)
        if not same:
            raise RuntimeError(f"--workers {workers} wrote other ids than one process")
    summary = {
        "rows": n,
        "workers": workers,
        "rows_per_s_ratio(median)": round(float(np.median(ratios)), 2),
        "ratios": " ".join(f"{x:.2f}" for x in ratios),
        "cpu_s_ratio(median)": round(float(np.median(cpu_ratios)), 2),
        "cpus": len(os.sched_getaffinity(0)),
        "load_avg_1min": round(os.getloadavg()[0], 1),
        "autogroup": _autogroup(),
    }
    print_table(f"preprocess: --workers 1 vs {workers}, interleaved", runs)
    print_table(f"preprocess: rows/s of --workers {workers} over one worker (same ids)", [summary])
    return {"runs": runs, **summary}


def _autogroup() -> str:
    try:
        return {"0": "off", "1": "on"}[
            Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
        ]
    except (OSError, KeyError):
        return "?"


def _same_ids(a: Path, b: Path) -> bool:
    """Whether two prepared datasets hold the same vocabulary and rows (ids and values)."""
    import pyarrow.parquet as pq

    from datasets.prepared import SPLITS, DatasetMeta

    if not pq.read_table(a / "vocab.parquet").equals(pq.read_table(b / "vocab.parquet")):
        return False
    meta_a, meta_b = DatasetMeta.load(a), DatasetMeta.load(b)
    for split in SPLITS:
        if meta_a.split(split).files != meta_b.split(split).files:
            return False
        for fa, fb in zip(meta_a.files(split), meta_b.files(split), strict=True):
            if not pq.read_table(fa).equals(pq.read_table(fb)):
                return False
    return True
