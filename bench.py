"""Sweeps and performance benchmarks, each reported as ratios measured side by side in one run.

``python bench.py`` runs the quick default sections; ``python bench.py --only preprocess``
runs named ones; ``python bench.py --list`` lists them. Every section prints a table and writes
its figures to ``.bench-cache/results/<section>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

CACHE = Path(os.environ.get("CTR_BENCH_CACHE", ".bench-cache"))
SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], dict], bool]] = {}


def section(name: str, default: bool = True) -> Callable:
    """Registers a benchmark section; ``default`` sections run when no ``--only`` is given."""

    def register(fn: Callable[[argparse.Namespace], dict]) -> Callable[[argparse.Namespace], dict]:
        SECTIONS[name] = (fn, default)
        return fn

    return register


def print_table(title: str, rows: list[dict]) -> None:
    """Prints ``rows`` (dicts sharing keys) as an aligned text table."""
    print(f"\n== {title} ==")
    if not rows:
        print("(no rows)")
        return
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e3 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


# ---------------------------------------------------------------- shared helpers
DEFAULT_ROWS = 1_000_000


def default_dataset(args: argparse.Namespace, rows: int | None = None, **config: object) -> Path:
    """The default synthetic dataset (Criteo profile at scale 0.01), generated once and cached."""
    from datasets.synthetic import SyntheticConfig, generate_synthetic

    rows = rows or getattr(args, "rows", None) or DEFAULT_ROWS
    config.setdefault("min_count", 10)  # as `ctr synth` and Criteo preparation
    cfg = SyntheticConfig(rows=rows, **config)
    key = "-".join(f"{k}{v}" for k, v in sorted(config.items()))
    path = CACHE / "data" / f"synth-{rows}{'-' + key if key else ''}"
    if not (path / "meta.json").exists():
        print(f"generating {path} ...")
        generate_synthetic(path, cfg, progress=True)
    return path


def cached_run(name: str, **run: object) -> dict:
    """Trains ``RunConfig(**run)`` under .bench-cache/runs/NAME, reusing a finished summary.

    Interrupted sweeps resume: finished runs are skipped, a half-trained one continues from
    its checkpoint.
    """
    from ctr.run import RunConfig, train_run
    from ctr.trainer import TrainConfig

    train = run.pop("train", {})
    cfg = RunConfig(**run, train=TrainConfig(progress=False, **train))
    run_dir = CACHE / "runs" / name
    summary_path = run_dir / "summary.json"
    config_path = run_dir / "config.json"
    if summary_path.exists() and json.loads(config_path.read_text()) == json.loads(
        json.dumps(cfg.to_json())
    ):
        return json.loads(summary_path.read_text())
    if config_path.exists() and not summary_path.exists():
        print(f"  resuming {name}")
    elif run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    print(f"  training {name} ...", flush=True)
    return train_run(cfg, run_dir)


def protocol_sweep(name: str, args: argparse.Namespace, **spec: object) -> list[dict]:
    """Runs a :class:`ctr.sweep.SweepSpec` under .bench-cache/sweeps/NAME (resumable: finished
    cells are reused) and writes its report; returns the cells' results.

    The protocol comes from ``spec["protocol"]`` overridden by ``--grid-lrs``, ``--grid-l2s``
    and ``--sweep-epochs``; ``--workers`` runs cells in parallel processes.
    """
    from ctr.sweep import SweepSpec, run_sweep
    from ctr.sweep_report import write_report

    protocol = dict(spec.pop("protocol", {}) or {})
    if getattr(args, "grid_lrs", None):
        protocol["table_lrs"] = [float(x) for x in args.grid_lrs.split(",")]
        protocol["grid"] = []
    if getattr(args, "grid_l2s", None):
        protocol["embedding_l2s"] = [float(x) for x in args.grid_l2s.split(",")]
        protocol["grid"] = []
    if getattr(args, "sweep_epochs", None):
        protocol["epochs"] = args.sweep_epochs
    if getattr(args, "grid_optimizers", None):
        protocol["optimizers"] = args.grid_optimizers.split(",")
        protocol["grid"] = []
    sweep = SweepSpec.from_json({**spec, "protocol": protocol}, name)
    out = CACHE / "sweeps" / name
    results = run_sweep(sweep, out, workers=getattr(args, "workers", 1) or 1)
    paths = write_report(out)
    print(f"  report: {paths['markdown']}, {paths['png'][0]}")
    return results


def seed_stats(results: list[dict], method: str, budget: str) -> dict | None:
    """Mean, spread and bytes of one method at one budget over its finished seeds."""
    aucs = [
        r["test_auc"]
        for r in results
        if r["method"] == method and str(r["budget"]) == budget and r["status"] == "done"
    ]
    if not aucs:
        return None
    size = next(
        r["serve_bytes"]
        for r in results
        if r["method"] == method and r["status"] == "done" and str(r["budget"]) == budget
    )
    return {
        "mean": sum(aucs) / len(aucs),
        "spread": max(aucs) - min(aucs),
        "aucs": aucs,
        "bytes": size,
    }


def timed_steps(step: Callable[[object], object], batches: list, repeats: int = 1) -> float:
    """Samples per second of ``step`` over ``batches`` (after one warm-up batch)."""
    step(batches[0])
    start = time.perf_counter()
    samples = 0
    for _ in range(repeats):
        for b in batches[1:]:
            step(b)
            samples += len(b.labels)
    return samples / (time.perf_counter() - start)


# ---------------------------------------------------------------- foundation
class PlainDeepFM:
    """The plain-PyTorch baseline: ``nn.EmbeddingBag`` per field with sparse gradients, same
    first-order/FM/MLP as ``ctr``'s DeepFM. ``table_optimizer``: ``"sparse_adam"`` (the
    strongest plain setting) or ``"adagrad"`` (torch's sparse Adagrad: the same family as
    ``ctr``'s fused rowwise Adagrad)."""

    def __init__(
        self,
        meta: object,
        dim: int,
        hidden: list[int],
        lr: float = 1e-3,
        table_optimizer: str = "sparse_adam",
        table_lr: float = 0.05,
    ) -> None:
        import torch
        from torch import nn

        from ctr.models.layers import FirstOrder, mlp

        self.names = [f.name for f in meta.sparse]
        self.bags = nn.ModuleList(
            [nn.EmbeddingBag(f.cardinality, dim, mode="sum", sparse=True) for f in meta.sparse]
        )
        self.linear = FirstOrder(len(self.names), dim, len(meta.dense))
        self.deep = mlp(len(self.names) * dim + len(meta.dense), hidden, 1)
        dense = list(self.linear.parameters()) + list(self.deep.parameters())
        tables = list(self.bags.parameters())
        self.opts = [
            torch.optim.SparseAdam(tables, lr=lr)
            if table_optimizer == "sparse_adam"
            else torch.optim.Adagrad(tables, lr=table_lr),
            torch.optim.Adam(dense, lr=lr),
        ]

    def step(self, batch: object) -> float:
        import torch
        import torch.nn.functional as F

        from ctr.models.layers import fm_interaction

        kjt = batch.sparse_features
        emb = torch.stack(
            [
                bag(kjt[n].values(), kjt[n].offsets()[:-1])
                for bag, n in zip(self.bags, self.names, strict=True)
            ],
            dim=1,
        )
        dense = batch.dense_features
        deep = self.deep(torch.cat([emb.flatten(1), dense], 1)).squeeze(1)
        logits = self.linear(emb, dense) + fm_interaction(emb) + deep
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        for o in self.opts:
            o.zero_grad()
        loss.backward()
        for o in self.opts:
            o.step()
        return loss.item()


@section("train")
def bench_train(args: argparse.Namespace) -> dict:
    """DeepFM + full on the default synthetic data: AUC vs teacher, speed vs plain PyTorch."""
    from ctr.run import RunConfig, build_run_model
    from ctr.trainer import TrainConfig, Trainer
    from datasets.format import DatasetMeta
    from datasets.loader import BatchLoader

    data = default_dataset(args)
    meta = DatasetMeta.load(data)
    summary = cached_run("deepfm-full-1x", data=str(data), model="deepfm", compressor="full")
    teacher = meta.extra["teacher"]["test_auc"]

    loader = BatchLoader(meta, "train", batch_size=4096, shuffle=True)
    start = time.perf_counter()
    rows = sum(len(b.labels) for b in loader.epoch(0))
    loader_cold = rows / (time.perf_counter() - start)
    start = time.perf_counter()
    rows = sum(len(b.labels) for b in loader.epoch(1))
    loader_warm = rows / (time.perf_counter() - start)

    batches = [b for _, b in zip(range(41), loader.epoch(2), strict=False)]
    ours = Trainer(
        build_run_model(RunConfig(data=str(data))),
        loader,
        BatchLoader(meta, "valid"),
        TrainConfig(progress=False),
    )
    plain = PlainDeepFM(meta, 16, [400, 400, 400])
    plain_adagrad = PlainDeepFM(meta, 16, [400, 400, 400], table_optimizer="adagrad")
    speeds = {"ctr": [], "plain": [], "plain_adagrad": []}
    for _ in range(2):  # interleaved, so drift on a shared machine hits all alike
        speeds["ctr"].append(timed_steps(ours.train_step, batches))
        speeds["plain"].append(timed_steps(plain.step, batches))
        speeds["plain_adagrad"].append(timed_steps(plain_adagrad.step, batches))
    ctr_sps, plain_sps = max(speeds["ctr"]), max(speeds["plain"])
    adagrad_sps = max(speeds["plain_adagrad"])
    rows_out = [
        {"what": "DeepFM full test AUC", "value": summary["test_auc"]},
        {"what": "teacher test AUC (ceiling)", "value": teacher},
        {"what": "AUC gap to teacher", "value": teacher - summary["test_auc"]},
        {"what": "DeepFM full test logloss", "value": summary["test_logloss"]},
        {"what": "ctr train samples/s (fused fbgemm)", "value": ctr_sps},
        {"what": "plain PyTorch samples/s (SparseAdam)", "value": plain_sps},
        {"what": "plain PyTorch samples/s (sparse Adagrad)", "value": adagrad_sps},
        {"what": "throughput ratio ctr / plain SparseAdam", "value": ctr_sps / plain_sps},
        {
            "what": "throughput ratio ctr / plain Adagrad (same family)",
            "value": ctr_sps / adagrad_sps,
        },
        {"what": "loader rows/s (first epoch, decode)", "value": loader_cold},
        {"what": "loader rows/s (cached)", "value": loader_warm},
    ]
    print_table("train: DeepFM + full, default synthetic data", rows_out)
    return {
        "summary": summary,
        "teacher_auc": teacher,
        "ctr_samples_per_sec": ctr_sps,
        "plain_samples_per_sec": plain_sps,
        "ratio": ctr_sps / plain_sps,
        "plain_adagrad_samples_per_sec": adagrad_sps,
        "ratio_same_optimizer_family": ctr_sps / adagrad_sps,
        "loader_rows_per_sec_cold": loader_cold,
        "loader_rows_per_sec_warm": loader_warm,
    }


# ----------------------------------------------------------------------------- preprocessing


def _write_criteo_tsv(path: Path, rows: int, seed: int = 0, chunk: int = 1 << 19) -> None:
    """A Criteo-format TSV with Kaggle-sized Zipf vocabularies, written column-wise by Arrow."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from datasets.synthetic import CRITEO_KAGGLE_CARDINALITIES, _zipf_ranks, splitmix64

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
    tmp = path.with_name(path.name + ".tmp")
    options = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
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
                nibbles = (ids[:, None] >> (np.arange(28, -1, -4, dtype=np.uint64))) & np.uint64(15)
                data = pa.py_buffer(hex_digits[nibbles.astype(np.int64)].tobytes())
                offsets = pa.py_buffer(np.arange(0, 8 * n + 1, 8, dtype=np.int32).tobytes())
                valid = pa.array(rng.random(n) >= missing[f]).buffers()[1]
                cols.append(pa.StringArray.from_buffers(n, offsets, data, valid))
            writer.write_table(pa.Table.from_arrays(cols, schema=_criteo_bench_schema()))
    os.replace(tmp, path)


def _criteo_bench_schema():
    import pyarrow as pa

    from datasets.prepare.criteo import CRITEO_COLUMNS

    return pa.schema([(c, pa.string()) for c in CRITEO_COLUMNS])


_PREPARE_CHILD = """
import json, sys, time
from datasets.prepare import PrepareOptions, prepare_criteo
start = time.perf_counter()
options = PrepareOptions(overwrite=True, progress=False)
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
    import subprocess

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


@section("preprocess", default=False)
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
    return {"runs": rows, **ratios}


@section("lookup_speed", default=False)
def bench_lookup_speed(args: argparse.Namespace) -> dict:
    """Embedding-layer step and serving time of the table-less methods vs full, side by side."""
    import statistics

    import torch

    from compressors import build_compressor, build_serving
    from ctr.embedding import features_from_dataset
    from ctr.trainer import table_modules
    from datasets.format import DatasetMeta
    from datasets.loader import BatchLoader

    budget, rounds, methods = "100x", 5, ["full", "tt", "robe", "dhe"]
    meta = DatasetMeta.load(default_dataset(args))
    features = features_from_dataset(meta)
    batches = [
        b.sparse_features
        for _, b in zip(
            range(4), BatchLoader(meta, "train", 4096, shuffle=True).epoch(0), strict=False
        )
    ]
    layers, serving, optimizers = {}, {}, {}
    for name in methods:
        torch.manual_seed(0)
        layer = build_compressor(name, features, 16, "1x" if name == "full" else budget)
        serving[name] = build_serving(layer.export()).eval()
        # Training as the trainer does it: fused tables update inside backward, the rest Adam.
        for tables in table_modules(layer):
            tables.fuse("rowwise_adagrad", 0.05)
        fused = {id(p) for tables in table_modules(layer) for p in tables.parameters()}
        dense = [p for p in layer.parameters() if p.requires_grad and id(p) not in fused]
        optimizers[name] = torch.optim.Adam(dense, lr=1e-3) if dense else None
        layers[name] = layer.train()

    def train_step(name: str, kjt: object) -> None:
        out = layers[name](kjt)
        out.backward(torch.ones_like(out))
        if optimizers[name] is not None:
            optimizers[name].step()
            optimizers[name].zero_grad()

    @torch.no_grad()
    def serve(name: str, kjt: object) -> None:
        serving[name](kjt)

    def seconds(fn: Callable[[str, object], None], name: str) -> float:
        fn(name, batches[0])  # warm-up
        start = time.perf_counter()
        for kjt in batches[1:]:
            fn(name, kjt)
        return (time.perf_counter() - start) / (len(batches) - 1)

    times: dict[str, dict[str, list[float]]] = {m: {"train": [], "serve": []} for m in methods}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits all alike
        for name in methods:
            times[name]["train"].append(seconds(train_step, name))
            times[name]["serve"].append(seconds(serve, name))
    median = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    rows = [
        {
            "method": name,
            "budget": "1x" if name == "full" else budget,
            "serve_bytes": layers[name].memory().serve_bytes,
            "train_ms": 1e3 * median[name]["train"],
            "train_vs_full": median[name]["train"] / median["full"]["train"],
            "serve_ms": 1e3 * median[name]["serve"],
            "serve_vs_full": median[name]["serve"] / median["full"]["serve"],
        }
        for name in methods
    ]
    print_table(
        f"lookup_speed: {len(features)} fields x 4096 rows per batch, "
        f"{torch.get_num_threads()} threads, median of {rounds} rounds",
        rows,
    )
    return {
        "rows": rows,
        "threads": torch.get_num_threads(),
        "batch": 4096,
        "fields": len(features),
    }


# ---------------------------------------------------------------- precision family
PRECISION_DTYPES = ("fp32", "fp16", "int8", "int4", "int2")


def _serving_tables(cards: list[int], dim: int, seed: int = 0) -> dict[str, object]:
    """The same random tables behind every serving format: fbgemm's int-N TBE per dtype and
    the binary module at b=1 and b=4 (built one format at a time to bound memory)."""
    modules = _int_tables(cards, dim, seed)
    modules.update(_binary_tables(cards, dim, (1, 4), seed))
    return modules


def _random_tables(cards: list[int], dim: int, seed: int) -> object:
    import torch

    gen = torch.Generator().manual_seed(seed)
    for n in cards:
        yield torch.randn(n, dim, generator=gen) * 0.1


def _int_tables(cards: list[int], dim: int, seed: int, dtypes=PRECISION_DTYPES) -> dict:
    from compressors.core.storage import Lookup, ServeTables, TableSpec, pack_rows

    names = [f"C{i + 1}" for i in range(len(cards))]
    lookups = [Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)]
    modules: dict[str, object] = {}
    for dtype in dtypes:
        specs = [TableSpec(f"t_{n}", c, dim, dtype) for n, c in zip(names, cards, strict=True)]
        weights = _random_tables(cards, dim, seed)
        packed = {s.name: pack_rows(w, dtype) for s, w in zip(specs, weights, strict=True)}
        modules[dtype] = ServeTables(specs, lookups, packed)
        del packed
    return modules


def _binary_tables(
    cards: list[int],
    dim: int,
    bits: Sequence[int],
    seed: int = 0,
    decodes: Sequence[tuple[str, str]] = (("auto", "int2"),),
) -> dict:
    """Binary serving modules over the same random tables: one per plane count and
    ``(decode, plane dtype)``, keyed ``binary b=B DECODE[/DTYPE]``."""
    from compressors.precision.binary import BinaryServing, binarize, binary_export

    names = [f"C{i + 1}" for i in range(len(cards))]
    modules: dict[str, object] = {}
    for b in bits:
        parts = [binarize(w, b) for w in _random_tables(cards, dim, seed)]
        exported = binary_export(names, dim, [c for c, _ in parts], [s for _, s in parts])
        for decode, plane_dtype in decodes:
            label = f"binary b={b} {decode}" + (f"/{plane_dtype}" if decode == "planes" else "")
            modules[label] = BinaryServing(exported, decode, plane_dtype)
    return modules


def _codebook_tables(cards: list[int], dim: int, seed: int = 0) -> dict:
    """Codebook serving modules (dpq/mgqe's export format) with random codes and values,
    keyed by their setting; ``serve_bytes`` is the artifact's size, ``resident_bytes`` what
    the loaded module holds."""
    import torch

    from compressors import ExportedEmbedding
    from compressors.codebook.pq import KIND, CodebookPlan, CodebookServing, pack_codes

    names = [f"C{i + 1}" for i in range(len(cards))]
    gen = torch.Generator().manual_seed(seed)
    settings = {
        "dpq P=4 K=256": (4, (256,), tuple(cards)),
        "dpq P=8 K=64": (8, (64,), tuple(cards)),
        "mgqe P=4 K=256/64": (4, (256, 64), tuple(-(-c // 10) for c in cards)),
    }
    modules: dict[str, object] = {}
    for label, (parts, choices, heads) in settings.items():
        plan = CodebookPlan(dim, parts, choices, tuple(cards), heads, 1)
        tensors = {
            f"codes.{t}": pack_codes(torch.randint(0, k, (rows, parts), generator=gen), bits)
            for t, (k, rows, bits) in enumerate(
                zip(choices, plan.tier_rows(), plan.bits, strict=True)
            )
        }
        tensors["values"] = torch.randn(1, parts, choices[0], dim // parts, generator=gen)
        config = {"method": label.split()[0], "fields": names, **plan.to_json()}
        module = CodebookServing(ExportedEmbedding(KIND, config, tensors))
        module.serve_bytes = plan.serve_bytes
        modules[label] = module
    return modules


def _pruned_index_tables(cards: list[int], dim: int, keep: float, seed: int = 0) -> dict:
    """fp32 lookups of the same kept rows (a random ``keep`` fraction of each field) behind
    the two index forms a pruned export picks from: an id -> row array (int16/int32 per id)
    and a rank bitmap (2.5 bits per id); plus the unpruned table. The ratio isolates what
    the index costs a lookup."""
    import torch
    from torch import nn

    from compressors.core.storage import Lookup, ServeTables, TableSpec, pack_rows
    from compressors.pruning.common import RemapMap, build_bitmap, build_remap

    names = [f"C{i + 1}" for i in range(len(cards))]
    lookups = [Lookup(n, f"t_{n}", field=i) for i, n in enumerate(names)]
    gen = torch.Generator().manual_seed(seed)
    keeps = [torch.rand(n, generator=gen) < keep for n in cards]
    for k in keeps:
        k[0] = True  # a small field keeps at least one row
    weights = list(_random_tables(cards, dim, seed))
    kept = {
        f"t_{n}": pack_rows(w[k], "fp32") for n, w, k in zip(names, weights, keeps, strict=True)
    }
    specs = [TableSpec(f"t_{n}", len(kept[f"t_{n}"]), dim, "fp32") for n in names]
    forms = {
        "array": RemapMap(names, {n: build_remap(k) for n, k in zip(names, keeps, strict=True)}),
        "bitmap": RemapMap(
            names, {}, {n: build_bitmap(k) for n, k in zip(names, keeps, strict=True)}
        ),
    }
    modules: dict[str, object] = _int_tables(cards, dim, seed, ("fp32",))
    for form, index in forms.items():
        module = nn.Sequential(index, ServeTables(specs, lookups, kept))
        module.index_bytes = sum(t.numel() * t.element_size() for t in index.tensors().values())
        modules[f"pruned {form}"] = module
    return modules


def _lookup_speed(modules: dict[str, object], batches: list, repeats: int = 5) -> dict[str, float]:
    """Lookups per CPU-second of each module over ``batches``, on one thread.

    Every batch is timed alone with the thread's CPU clock, modules interleaved batch by batch,
    and each batch's best of ``repeats`` summed: on a shared machine wall time mostly measures
    the other processes, and CPU time of a single thread does not.
    """
    import torch

    best = {name: [float("inf")] * len(batches) for name in modules}
    lookups = sum(len(kjt.values()) for kjt in batches)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for module in modules.values():
                module(batches[0])  # warm-up
            for _ in range(repeats):
                for i, kjt in enumerate(batches):
                    for name, module in modules.items():
                        start = time.thread_time()
                        module(kjt)
                        best[name][i] = min(best[name][i], time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: lookups / sum(times) for name, times in best.items()}


def _evaluate_export(model: object, meta: object, out: Path) -> dict:
    """Exports ``model``, reloads it as a CompactModel and scores it on the test split."""
    from ctr.artifact import CompactModel, export
    from ctr.metrics import auc_logloss
    from datasets.loader import BatchLoader

    manifest = export(model, out, overwrite=True)  # bench.py's own cache
    compact = CompactModel.load(out)
    probs, labels = compact.predict_loader(BatchLoader(meta, "test", batch_size=16384))
    memory = manifest["embedding"]["memory"]
    return {
        "serve_MB": memory["serve_bytes"] / 1e6,
        "ratio": memory["ratio"],
        **auc_logloss(labels, probs),
        "train_MB": memory["train_bytes"] / 1e6,
    }


@section("precision", default=False)
def bench_precision(args: argparse.Namespace) -> dict:
    """Precision family: serving lookup speed per format, AUC/logloss at each natural ratio."""
    import dataclasses
    import shutil

    import numpy as np
    import torch
    from torchrec import KeyedJaggedTensor

    from compressors.core.base import Stage
    from ctr.run import RunConfig, build_run_model, load_run_model
    from datasets.format import DatasetMeta
    from datasets.loader import BatchLoader

    data = default_dataset(args)
    meta = DatasetMeta.load(data)
    cards = [f.cardinality for f in meta.sparse]
    batch, dim = 4096, 16

    # (1) serving lookup throughput, 26 fields x 4096 single-hot ids per batch.
    real = [
        b.sparse_features
        for _, b in zip(
            range(8), BatchLoader(meta, "test", batch_size=batch).epoch(0), strict=False
        )
    ]
    rng = np.random.default_rng(0)
    big_rows = 1_000_000
    uniform = [
        KeyedJaggedTensor(
            keys=[f.name for f in meta.sparse],
            values=torch.from_numpy(rng.integers(0, big_rows, 26 * batch)),
            lengths=torch.ones(26 * batch, dtype=torch.int64),
        )
        for _ in range(8)
    ]
    speed_rows = []
    for setting, tables, batches in (
        (f"synthetic vocab ({sum(cards):,} rows), test batches", cards, real),
        (f"26 x {big_rows:,} rows, uniform ids", [big_rows] * 26, uniform),
    ):
        speeds = _lookup_speed(_serving_tables(tables, dim), batches)
        for name, lps in speeds.items():
            speed_rows.append(
                {
                    "tables": setting,
                    "format": name,
                    "lookups/s": lps,
                    "vs fp32": lps / speeds["fp32"],
                }
            )
    print_table(
        "precision: serving lookups per CPU-second, 1 thread (ratio to fp32, one run)", speed_rows
    )

    # (2) AUC/logloss of each format at its natural ratio, DeepFM on the default data.
    full_run = CACHE / "runs" / "deepfm-full-1x"
    cached_run("deepfm-full-1x", data=str(data), model="deepfm", compressor="full")
    base_cfg = RunConfig.load(full_run)
    state = torch.load(full_run / "model.pt", weights_only=True)
    out = CACHE / "precision"
    shutil.rmtree(out, ignore_errors=True)
    quality = []

    def post_trained(compressor: str, budget: str, options: dict) -> object:
        cfg = dataclasses.replace(
            base_cfg, compressor=compressor, budget=budget, method_options=options
        )
        model = build_run_model(cfg, meta)
        own = model.state_dict()
        loaded = {k: v for k, v in state.items() if k in own}
        prefix = "embedding.compressor.tables.ebc.embedding_bags."
        if compressor == "binary":  # one shared table: the per-field tables stacked
            loaded[prefix + "shared.weight"] = torch.cat(
                [state[f"{prefix}t_{f.name}.weight"] for f in meta.sparse]
            )
        model.load_state_dict({**own, **loaded})
        return model

    for dtype in PRECISION_DTYPES:
        model = post_trained("full", "1x", {"storage": dtype})
        quality.append(
            {
                "method": f"full, served {dtype}",
                "how": "post-training",
                **_evaluate_export(model, meta, out / dtype),
            }
        )
    for budget in ("4x", "6x"):
        model = post_trained("ptq", budget, {})
        model.embedding.compressor.run_stage(Stage("quantize", trains=False), None)
        dtypes = model.embedding.compressor.hyperparameters()["dtypes"]
        mix = ", ".join(
            f"{d}:{list(dtypes.values()).count(d)}"
            for d in PRECISION_DTYPES
            if d in dtypes.values()
        )
        quality.append(
            {
                "method": f"ptq mixed @{budget} ({mix})",
                "how": "post-training",
                **_evaluate_export(model, meta, out / f"ptq-{budget}"),
            }
        )
    for bits in (1, 2, 4):
        model = post_trained("binary", "1x", {"bits": bits})
        model.embedding.compressor.run_stage(Stage("binarize", trains=False), None)
        quality.append(
            {
                "method": f"binary b={bits}",
                "how": "post-training",
                **_evaluate_export(model, meta, out / f"binary-{bits}"),
            }
        )
    for name, compressor, budget, options in (
        ("deepfm-int8-3x", "int8", "3x", {}),
        ("deepfm-int16-2x", "int16", "2x", {}),
        ("deepfm-alpt-3x", "alpt", "3x", {}),
        ("deepfm-alpt-int2-8x", "alpt", "8x", {"bits": 2}),
    ):
        cached_run(
            name,
            data=str(data),
            model="deepfm",
            compressor=compressor,
            budget=budget,
            method_options=options,
        )
        model, _ = load_run_model(CACHE / "runs" / name)
        bits = model.embedding.compressor.bits
        quality.append(
            {
                "method": f"{compressor} ({bits}-bit codes)",
                "how": "trained",
                **_evaluate_export(model, meta, out / name),
            }
        )
    print_table(
        "precision: DeepFM on the default synthetic data, exported artifacts on test "
        f"(teacher AUC {meta.extra['teacher']['test_auc']:.4f})",
        quality,
    )
    return {"lookup_speed": speed_rows, "quality": quality}


# ---------------------------------------------------------------- inter-feature methods (issue 4)
INTER_FEATURE = ("hash", "unified", "qr", "tt", "robe", "dhe", "adapt")
INTER_FEATURE_BUDGETS = ("10x", "100x", "1000x")


def _fits(method: str, features: list, budget: str, **options: object) -> str | None:
    """None when ``method`` fits ``budget``, else the BudgetError's message (solve() only:
    nothing is built)."""
    from compressors import BudgetError, solve

    try:
        solve(method, features, 16, budget, **options)
    except BudgetError as e:
        return str(e)
    return None


@section("inter_feature", default=False)
def bench_inter_feature(args: argparse.Namespace) -> dict:
    """Inter-feature methods at 10x/100x/1000x: AUC, logloss, bytes, step time vs full."""
    import compressors
    from ctr.embedding import features_from_dataset
    from ctr.run import RunConfig, build_run_model
    from ctr.trainer import TrainConfig, Trainer
    from datasets.format import DatasetMeta
    from datasets.loader import BatchLoader

    data = default_dataset(args)
    meta = DatasetMeta.load(data)
    features = features_from_dataset(meta)
    methods = [m for m in INTER_FEATURE if m in compressors.available()]
    swept = protocol_sweep(
        "inter_feature",
        args,
        data=[str(data)],
        methods=methods,
        budgets=list(INTER_FEATURE_BUDGETS),
        seeds=[0],
    )
    by_cell = {(r["method"], str(r["budget"])): r for r in swept}
    full = by_cell[("full", "1x")]

    loader = BatchLoader(meta, "train", batch_size=4096, shuffle=True)
    batches = [b for _, b in zip(range(21), loader.epoch(7), strict=False)]

    def trainer(method: str, budget: str) -> Trainer:
        model = build_run_model(RunConfig(data=str(data), compressor=method, budget=budget))
        return Trainer(model, loader, BatchLoader(meta, "valid"), TrainConfig(progress=False))

    full_trainer = trainer("full", "1x")
    rows = [
        {
            "method": "full",
            "budget": "1x",
            "ratio": 1.0,
            "test_auc": full["test_auc"],
            "test_logloss": full["test_logloss"],
            "serve_bytes": full["serve_bytes"],
            "train_bytes": full["train_bytes"],
            "step_time_vs_full": 1.0,
            "note": "",
        }
    ]
    for method in methods:
        for budget in INTER_FEATURE_BUDGETS:
            refused = _fits(method, features, budget)
            if refused:
                rows.append({"method": method, "budget": budget, "note": refused})
                continue
            summary = by_cell[(method, budget)]
            # Interleaved with full, best of two rounds each: drift on a shared machine hits
            # both alike.
            ours = trainer(method, budget)
            full_sps, our_sps = [], []
            for _ in range(2):
                full_sps.append(timed_steps(full_trainer.train_step, batches))
                our_sps.append(timed_steps(ours.train_step, batches))
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "ratio": summary["ratio"],
                    "test_auc": summary["test_auc"],
                    "test_logloss": summary["test_logloss"],
                    "serve_bytes": summary["serve_bytes"],
                    "train_bytes": summary["train_bytes"],
                    "step_time_vs_full": max(full_sps) / max(our_sps),
                    "note": "",
                }
            )
    print_table(
        "inter_feature: DeepFM, default synthetic data, fair protocol, seed 0 (teacher AUC "
        f"{meta.extra['teacher']['test_auc']:.4f})",
        [{k: v for k, v in r.items() if k != "note"} for r in rows if not r["note"]],
    )
    for r in rows:
        if r["note"]:
            print(f"  {r['method']} at {r['budget']}: {r['note']}")
    plot = _pareto_plot(rows, CACHE / "results" / "inter_feature.png")
    return {
        "rows": rows,
        "methods": methods,
        "teacher_auc": meta.extra["teacher"]["test_auc"],
        "plot": str(plot),
    }


# ---------------------------------------------------------------- dimension search (issue 11)
# (label, method, options): DNIS with the paper's |e ⊙ α| score and with α's column ranking.
DIMENSION = (
    ("dnis", "dnis", {}),
    ("dnis-alpha", "dnis", {"prune_score": "alpha"}),
    ("mde", "mde", {}),
    ("autodim", "autodim", {}),
)
DIMENSION_BUDGETS = ("2x", "5x", "10x", "20x")


def _mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std; the value alone for one seed)."""
    import numpy as np

    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


@section("dimension", default=False)
def bench_dimension(args: argparse.Namespace) -> dict:
    """Dimension search (dnis, dnis with α's column ranking, mde, autodim) at 2x/5x/10x/20x,
    fp32 and int8, over ``--seeds`` (default 0): AUC, logloss (mean ± std over seeds), bytes,
    stage wall times as ratios to full's (full trained with the same seeds)."""
    import numpy as np

    from ctr.embedding import features_from_dataset
    from datasets.format import DatasetMeta

    rows_arg = args.rows or 200_000
    data = default_dataset(args, rows=rows_arg, scale=0.001)
    batch = 4096 if rows_arg >= 200_000 else 1024
    meta = DatasetMeta.load(data)
    features = features_from_dataset(meta)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [0]

    def runs(name: str, **run: object) -> tuple[list[dict], list[dict[str, float]]]:
        out = [
            _staged_run(
                f"{name}-s{seed}" if seed else name,
                seed=seed,
                data=str(data),
                model="deepfm",
                dim=16,
                train={"batch_size": batch},
                **run,
            )
            for seed in seeds
        ]
        return out, [s["stage_seconds"] for s in out]

    def row(label: str, storage: str, budget: str, summaries: list[dict], stages) -> dict:
        mean_stages = {k: np.mean([t[k] for t in stages]) for k in stages[0]}
        return {
            "method": label,
            "storage": storage,
            "budget": budget,
            "ratio": float(np.mean([s["ratio"] for s in summaries])),
            "test_auc": _mean_std([s["test_auc"] for s in summaries]),
            "test_logloss": _mean_std([s["test_logloss"] for s in summaries]),
            "serve_bytes": int(max(s["serve_bytes"] for s in summaries)),
            "train_bytes": int(max(s["train_bytes"] for s in summaries)),
            "stages_vs_full": " ".join(f"{k} {v / full_time:.2f}" for k, v in mean_stages.items()),
            "seeds": len(summaries),
            "auc_by_seed": [s["test_auc"] for s in summaries],
            "note": "",
        }

    full, full_stages = runs("dimension-full", compressor="full")
    full_time = float(np.mean([sum(t.values()) for t in full_stages]))
    rows = [row("full", "fp32", "1x", full, full_stages)]
    budgets = args.budgets.split(",") if args.budgets else DIMENSION_BUDGETS
    storages = args.storages.split(",") if args.storages else ("fp32", "int8")
    wanted = set(args.methods.split(",")) if args.methods else None
    for budget in budgets:
        for storage in storages:
            for label, method, options in DIMENSION:
                if wanted and label not in wanted:
                    continue
                refused = _fits(method, features, budget, storage=storage, **options)
                if refused:
                    rows.append(
                        {"method": label, "storage": storage, "budget": budget, "note": refused}
                    )
                    continue
                summaries, stages = runs(
                    f"dimension-{label}-{storage}-{budget}",
                    compressor=method,
                    budget=budget,
                    method_options={"storage": storage, **options},
                )
                rows.append(row(label, storage, budget, summaries, stages))
                print(f"  {json.dumps(rows[-1])}", flush=True)
    print_table(
        f"dimension: DeepFM dim 16, synthetic {rows_arg} rows (scale 0.001), batch {batch}, "
        f"1 epoch per stage, seeds {seeds} (AUC, logloss: mean ± std; bytes: the largest; "
        f"teacher AUC {meta.extra['teacher']['test_auc']:.4f})",
        [
            {k: v for k, v in r.items() if k not in ("note", "auc_by_seed")}
            for r in rows
            if not r["note"]
        ],
    )
    for r in rows:
        if r["note"]:
            print(f"  {r['method']} ({r['storage']}) at {r['budget']}: {r['note']}")
    return {
        "rows": rows,
        "seeds": seeds,
        "teacher_auc": meta.extra["teacher"]["test_auc"],
        "full_stage_seconds": full_stages,
    }


@section("dnis_kept", default=False)
def bench_dnis_kept(args: argparse.Namespace) -> dict:
    """What DNIS keeps per field and frequency block on planted-teacher data, beside each
    field's planted signal (the setting of tests/test_dnis.py's planted test)."""
    import numpy as np

    from ctr.run import RunConfig, build_run_model
    from ctr.trainer import TrainConfig, Trainer
    from datasets.format import DatasetMeta
    from datasets.loader import BatchLoader
    from datasets.synthetic import SIGNAL_PATTERN

    cards = (40, 120, 600, 25, 300, 80, 15, 1000)
    data = default_dataset(args, rows=args.rows or 400_000, cardinalities=cards, num_dense=4)
    meta = DatasetMeta.load(data)
    cfg = RunConfig(
        data=str(data),
        model="deepfm",
        model_options={"hidden": [32]},
        dim=16,
        compressor="dnis",
        budget="10x",
        method_options=dict(
            alpha_lr=0.05, warmup_epochs=0.15, search_epochs=0.15, finetune_epochs=0.15
        ),
        train=TrainConfig(batch_size=1024, lr=3e-3, table_lr=0.2, progress=False, patience=1),
    )
    model = build_run_model(cfg, meta)
    trainer = Trainer(
        model,
        BatchLoader(meta, "train", 1024, shuffle=True, drop_last=True),
        BatchLoader(meta, "valid", 16384),
        cfg.train,
    )
    trainer.fit()
    metrics = trainer.evaluate(BatchLoader(meta, "test", 16384))
    layer = model.embedding.compressor
    kept = layer.kept_dims()
    alpha = layer.searched_alpha.mean(1).tolist()
    rows, index = [], 0
    for f, (name, blocks) in enumerate(kept.items()):
        for b, block in enumerate(blocks):
            rows.append(
                {
                    "field": name,
                    "signal": SIGNAL_PATTERN[f % len(SIGNAL_PATTERN)],
                    "block": b,
                    "ids": f"{block['ids'][0]}-{block['ids'][1]}",
                    "alpha": alpha[index],
                    "columns": block["columns"],
                    "entries_per_row": block["entries_per_row"],
                    "form": block["form"],
                }
            )
            index += 1
    print_table(
        f"dnis_kept: DNIS at 10x on planted data (test AUC {metrics['auc']:.4f}, teacher "
        f"{meta.extra['teacher']['test_auc']:.4f}; {layer.memory().serve_bytes} of "
        f"{layer.budget_bytes} bytes)",
        rows,
    )
    per_field = {
        name: float(np.mean([b["entries_per_row"] for b in blocks]))
        for name, blocks in kept.items()
    }
    return {"rows": rows, "per_field_entries": per_field, "test": metrics}


def _pareto_plot(rows: list[dict], path: Path) -> Path:
    """AUC against serve bytes (log x), one line per method, full as a reference point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted(
            (r["serve_bytes"], r["test_auc"])
            for r in rows
            if r["method"] == method and not r["note"]
        )
        if not points:
            continue
        x, y = zip(*points, strict=True)
        if method == "full":
            ax.scatter(x, y, marker="*", s=150, color="black", label="full (1x)", zorder=3)
        else:
            ax.plot(x, y, marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("serve bytes of the embeddings (log)")
    ax.set_ylabel("test AUC")
    ax.set_title("Inter-feature methods: AUC vs memory (DeepFM, synthetic)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# The paper's setting on both sides: every field multiplexed / hashed (threshold 0).
CLAIM_VARIANTS = {
    "hash": ("hash", {"threshold": 0}),
    "hash-shared": ("hash", {"shared": True, "threshold": 0}),
    "unified": ("unified", {"threshold": 0}),
}


@section("unified_claim", default=False)
def bench_unified_claim(args: argparse.Namespace) -> dict:
    """Unified Embedding's claim: multiplexed vs per-field hashing at equal bytes (3 seeds),
    every field compressed on both sides (``threshold=0``, the paper's setting)."""
    from ctr.embedding import features_from_dataset
    from datasets.format import DatasetMeta

    data = default_dataset(args)
    features = features_from_dataset(DatasetMeta.load(data))
    seeds = (0, 1, 2)
    variants = {v: m for v, (m, _) in CLAIM_VARIANTS.items()}
    # One sweep per variant: a spec's options are per method, and two variants share "hash".
    results = {
        variant: protocol_sweep(
            f"unified_claim-{variant}",
            args,
            data=[str(data)],
            methods=[method],
            budgets=[b for b in INTER_FEATURE_BUDGETS if not _fits(method, features, b, **options)],
            seeds=list(seeds),
            method_options={method: options},
            reference=False,
        )
        for variant, (method, options) in CLAIM_VARIANTS.items()
    }
    rows, wins, compared = [], 0, 0
    for budget in INTER_FEATURE_BUDGETS:
        per_variant = {
            v: st
            for v in CLAIM_VARIANTS
            if (st := seed_stats(results[v], variants[v], budget)) is not None
        }
        base = per_variant.get("hash")
        for variant, st in per_variant.items():
            rows.append(
                {
                    "budget": budget,
                    "variant": variant,
                    "serve_bytes": st["bytes"],
                    "mean_test_auc": st["mean"],
                    "seed_aucs": " ".join(f"{a:.4f}" for a in st["aucs"]),
                    "vs_per_field_hash": None if base is None else st["mean"] - base["mean"],
                }
            )
        if "unified" in per_variant and base is not None:
            compared += 1
            # A win counts only beyond the seed-to-seed spread of either method.
            unified = per_variant["unified"]
            wins += unified["mean"] - base["mean"] > max(unified["spread"], base["spread"])
    print_table("unified_claim: DeepFM, default synthetic data, fair protocol, 3 seeds", rows)
    verdict = (
        f"unified beats per-field hash beyond the seed spread at {wins} of {compared} "
        "budgets (the paper: multiplexing wins at equal bytes)"
    )
    print(verdict)
    return {"rows": rows, "verdict": verdict, "seeds": list(seeds)}


PRUNING = ("optembed", "pep", "deeplight")
PRUNING_BUDGETS = ("2x", "5x", "10x")
# Small scale (two shared cores): 8 small fields, batches of 1024, half an epoch a stage, and
# 5 search generations on one validation batch (the reference: 30 on the whole split).
PRUNING_DATA = {"cardinalities": (40, 120, 600, 25, 300, 80, 15, 1000), "num_dense": 4}
PRUNING_TRAIN = {"batch_size": 1024, "epochs": 0.5}
PRUNING_OPTIONS: dict[str, dict] = {
    "optembed": {"generations": 5, "search_batches": 1},
    "pep": {},
    "deeplight": {},  # its default schedule is fitted to the prune stage
}


def _staged_run(name: str, seed: int = 0, **run: object) -> dict:
    """Like :func:`cached_run`, also recording each stage's wall seconds (``stage_seconds``,
    from the method's stage hooks)."""
    import shutil
    from unittest import mock

    from compressors.core.registry import COMPRESSORS
    from ctr.run import RunConfig, train_run
    from ctr.trainer import TrainConfig

    train = run.pop("train", {})
    cfg = RunConfig(**run, train=TrainConfig(progress=False, seed=seed, **train))
    run_dir = CACHE / "runs" / name
    summary_path = run_dir / "summary.json"
    if summary_path.exists() and json.loads((run_dir / "config.json").read_text()) == json.loads(
        json.dumps(cfg.to_json())
    ):
        summary = json.loads(summary_path.read_text())
        if "stage_seconds" in summary:
            return summary
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cls = COMPRESSORS[cfg.compressor]
    start_hook, end_hook = cls.on_stage_start, cls.on_stage_end
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def timed_start(self, stage, ctx):  # noqa: ANN001, ANN202
        started[stage.name] = time.perf_counter()
        return start_hook(self, stage, ctx)

    def timed_end(self, stage, ctx):  # noqa: ANN001, ANN202
        result = end_hook(self, stage, ctx)
        seconds[stage.name] = time.perf_counter() - started[stage.name]
        return result

    print(f"  training {name} ...", flush=True)
    with mock.patch.multiple(cls, on_stage_start=timed_start, on_stage_end=timed_end):
        summary = train_run(cfg, run_dir)
    summary["stage_seconds"] = seconds
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def _pruned_by(hp: dict) -> str:
    if "fallback" not in hp:
        return ""
    reached = f"thresholds reached {hp['reached_sparsity']:.3f}"
    return f"magnitude ({reached})" if hp["fallback"] else reached


@section("pruning", default=False)
def bench_pruning(args: argparse.Namespace) -> dict:
    """optembed, pep, deeplight at 2x-20x (+ int8): AUC, logloss, bytes, stage time vs full."""
    from ctr.embedding import features_from_dataset
    from datasets.format import DatasetMeta

    data = default_dataset(args, rows=getattr(args, "rows", None) or 200_000, **PRUNING_DATA)
    meta = DatasetMeta.load(data)
    features = features_from_dataset(meta)
    base = {"data": str(data), "model": "deepfm", "train": PRUNING_TRAIN}
    full = _staged_run("pruning-full-1x", **base, compressor="full")
    full_s = sum(full["stage_seconds"].values())
    rows = []

    def record(method: str, budget: str, summary: dict, storage: str = "fp32") -> None:
        rows.append(
            {
                "method": method,
                "budget": budget,
                "storage": storage,
                "ratio": summary["ratio"],
                "test_auc": summary["test_auc"],
                "test_logloss": summary["test_logloss"],
                "serve_bytes": summary["serve_bytes"],
                "budget_bytes": summary["budget_bytes"],
                "train_bytes": summary["train_bytes"],
                "stage_time_vs_full": " ".join(
                    f"{k}={v / full_s:.2f}" for k, v in summary["stage_seconds"].items()
                ),
                # pep: whether its thresholds reached the budget or the magnitude fallback did
                "pruned_by": _pruned_by(summary.get("hyperparameters", {})),
            }
        )

    record("full", "1x", full)
    refused = []
    for method in PRUNING:
        for budget in PRUNING_BUDGETS:
            for storage in ("fp32", "int8"):
                if storage == "int8" and budget == "10x":
                    continue  # time
                options = {**PRUNING_OPTIONS[method], "storage": storage}
                note = _fits(method, features, budget, **options)
                if note:
                    refused.append(f"{method} {storage} at {budget}: {note}")
                    continue
                summary = _staged_run(
                    f"pruning-{method}-{storage}-{budget}",
                    **base,
                    compressor=method,
                    budget=budget,
                    method_options=options,
                )
                record(method, budget, summary, storage)
    print_table(
        f"pruning: DeepFM, synthetic data ({meta.rows('train'):,} train rows), 0.5 epoch a stage "
        f"(teacher AUC {meta.extra['teacher']['test_auc']:.4f}; shared machine: times noisy)",
        rows,
    )
    for line in refused:
        print(f"  refused: {line}")

    # The paper's claim: at its budget, OptEmbed's AUC >= full's. 3 seeds each; a claim only
    # beyond the seed spread.
    claim_budget = "2x"
    seeds = (0, 1, 2)
    ours, theirs = [], []
    for seed in seeds:
        theirs.append(
            _staged_run(f"pruning-full-1x-s{seed}", seed=seed, **base, compressor="full")[
                "test_auc"
            ]
            if seed
            else full["test_auc"]
        )
        ours.append(
            _staged_run(
                f"pruning-optembed-fp32-{claim_budget}-s{seed}",
                seed=seed,
                **base,
                compressor="optembed",
                budget=claim_budget,
                method_options={**PRUNING_OPTIONS["optembed"], "storage": "fp32"},
            )["test_auc"]
        )
    spread = max(max(ours) - min(ours), max(theirs) - min(theirs))
    gap = sum(ours) / 3 - sum(theirs) / 3
    if gap > spread:
        verdict = f"optembed at {claim_budget} beats full by {gap:.4f} AUC (> spread {spread:.4f})"
    elif -gap > spread:
        verdict = f"full beats optembed at {claim_budget} by {-gap:.4f} AUC (> spread {spread:.4f})"
    else:
        verdict = (
            f"no claim: optembed at {claim_budget} vs full differ by {gap:+.4f} AUC, "
            f"within the seed spread {spread:.4f}"
        )
    print(f"claim (OptEmbed AUC >= full at its budget), seeds {list(seeds)}: {verdict}")
    return {
        "rows": rows,
        "refused": refused,
        "claim": {"optembed": ours, "full": theirs, "verdict": verdict},
        "teacher_auc": meta.extra["teacher"]["test_auc"],
    }


# ---------------------------------------------------------------- serving
SERVING_ROWS = 200_000
# (clients, rows per request): one caller, a few callers with small batches, many callers.
SERVING_LOADS = ((1, 1), (16, 8), (64, 8))


def _http_request(body: bytes) -> bytes:
    return (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


async def _load_clients(spec: dict) -> dict:
    """``spec["clients"]`` keep-alive connections to 127.0.0.1, each sending the next of
    ``spec["bodies"]`` as soon as its answer came (closed loop), for ``spec["seconds"]`` or
    ``spec["max_requests"]`` in all, whichever ends first; a request over 10 s is an error."""
    import asyncio
    import socket

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
    q = [float(x) * 1e3 for x in _percentiles(latencies, (50, 99, 99.9))]
    return {
        "requests/s": done / elapsed,
        "rows/s": done * rows / elapsed,
        "p50_ms": q[0],
        "p99_ms": q[1],
        "p999_ms": q[2],
        "errors": sum(errors.values()),
        "error kinds": ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "-",
    }


def _percentiles(values: list[float], qs: Sequence[float]) -> list[float]:
    import numpy as np

    return list(np.percentile(values, qs)) if values else [float("nan")] * len(qs)


def _run_load(spec: dict) -> dict:
    """The load generator in its own process (``python bench.py --loadgen``): the clients'
    work does not share this process's interpreter with the in-process figures."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--loadgen"],
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
    import re
    import select
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctr.cli", "serve", str(path), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
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


def _stop_server(proc: object) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _batch_rows(port: int) -> tuple[float, float]:
    """(sum, count) of rows per forward from the answering worker's /metrics."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("ctr_batch_rows_")
    )
    return float(values["ctr_batch_rows_sum"]), float(values["ctr_batch_rows_count"])


def _first_rows(batch: object, n: int) -> tuple[object, object]:
    """(dense, KJT) of the first ``n`` rows of a loader batch (single-hot or multi-hot)."""
    from torchrec import KeyedJaggedTensor

    kjt = batch.sparse_features
    per_key = kjt.to_dict()
    return batch.dense_features[:n], KeyedJaggedTensor.from_jt_dict(
        {k: _jt_rows(jt, n) for k, jt in per_key.items()}
    )


def _jt_rows(jt: object, n: int) -> object:
    from torchrec.sparse.jagged_tensor import JaggedTensor

    lengths = jt.lengths()[:n]
    return JaggedTensor(values=jt.values()[: int(lengths.sum())], lengths=lengths)


@section("serving", default=False)
def bench_serving(args: argparse.Namespace) -> dict:
    """`ctr serve` under keep-alive load (its own process) vs in-process CompactModel."""
    import numpy as np
    import torch

    from ctr import CompactModel, EmbeddingLayer, build_model, export
    from ctr.embedding import features_from_dataset
    from datasets.encode import RawEncoder
    from datasets.format import DatasetMeta
    from datasets.loader import BatchLoader

    torch.set_num_threads(1)
    data = default_dataset(args, rows=args.rows or SERVING_ROWS)
    meta = DatasetMeta.load(data)
    encoder = RawEncoder.load(data)
    rng = np.random.default_rng(0)
    seconds = float(os.environ.get("CTR_BENCH_SERVING_S", "4"))
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

    http_rows, inproc_rows, forms_rows = [], [], []
    for storage in ("fp32", "int8"):
        torch.manual_seed(0)
        layer = EmbeddingLayer(features_from_dataset(meta), 16, "full", "1x", storage=storage)
        model = build_model("deepfm", layer, len(meta.dense)).eval()
        path = CACHE / "serving" / storage
        export(model, path, dataset=data, overwrite=True)  # its own cache
        compact = CompactModel.load(path)
        coalesced: dict[tuple[int, int], float] = {}
        for workers in worker_counts:
            proc, port = _start_server(path, "--workers", str(workers))
            try:
                for clients, rows in SERVING_LOADS:
                    before = _batch_rows(port) if workers == 1 else (0.0, 0.0)
                    spec = {
                        "port": port,
                        "bodies": bodies[rows],
                        "rows": rows,
                        "clients": clients,
                        "seconds": seconds,
                        "warmup_s": 1.0,
                        "max_requests": 200_000,
                    }
                    load = _run_load(spec)
                    if workers == 1:
                        after = _batch_rows(port)
                        count = after[1] - before[1]
                        coalesced[clients, rows] = (after[0] - before[0]) / max(count, 1)
                    http_rows.append(
                        {
                            "storage": storage,
                            "workers": workers,
                            "clients x rows": f"{clients} x {rows}",
                            **load,
                            "batch rows (1 worker)": coalesced.get((clients, rows)),
                        }
                    )
            finally:
                _stop_server(proc)

        # In process, at the same batch sizes: raw records (encode + forward) and ids.
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
        for row in http_rows:
            if row["storage"] == storage:
                b = row["batch rows (1 worker)"] or coalesced.get(
                    tuple(int(x) for x in row["clients x rows"].split(" x ")), 1
                )
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
        f"serving: ctr serve on 127.0.0.1, keep-alive clients in their own process, {seconds:g} s "
        "per setting, rows form (shared machine: absolute figures are noisy)",
        http_rows,
    )
    print_table("serving: in-process CompactModel at the same batch sizes (1 thread)", inproc_rows)
    print_table("serving: rows form vs columns form, 10k rows in process", forms_rows)

    # Binary serving vs fp32 lookups, b=1 and b=2 side by side: the fast decode ("auto": one
    # kernel lookup an id), every plane its own int-N row ("planes", exact, b lookups an id),
    # and the default, the packed bits decoded in torch ("bits", the artifact's bytes).
    cards = [f.cardinality for f in meta.sparse]
    decodes = (("auto", "int2"), ("planes", "int2"), ("planes", "int8"), ("bits", "int2"))
    modules = {
        **_int_tables(cards, 16, 0, ("fp32",)),
        **_binary_tables(cards, 16, (1, 2), 0, decodes),
    }
    kjts = [b.sparse_features for b in ids_batches]
    speeds = _lookup_speed(modules, kjts)
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
    modules = {**_int_tables(cards, 16, 0, ("fp32",)), **_codebook_tables(cards, 16)}
    speeds = _lookup_speed(modules, kjts)
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
    modules = _pruned_index_tables(cards, 16, keep=0.1)
    speeds = _lookup_speed(modules, kjts)
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
        "forms": forms_rows,
        "binary": binary_rows,
        "pruned_index": pruned_rows,
        "codebook": codebook_rows,
    }


# ----------------------------------------------------------------------------- vs TorchRec
VS_TORCHREC_SCALES = {"large": 0.16, "small": 0.002}  # Criteo profile scales
DLRM_BOTTOM, DLRM_TOP = [64], [256, 128]


def _torchrec_dlrm_step(meta: object, lr: float, table_lr: float) -> Callable[[object], float]:
    """TorchRec's own DLRM (dense arch [64, D], over arch [256, 128, 1]) in DMP on one gloo
    rank: tables table-wise with fbgemm's fused rowwise Adagrad, dense parameters on Adam."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )
    from torchrec.distributed.types import ShardingEnv, ShardingType
    from torchrec.models.dlrm import DLRM
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    dim = 16
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{f.name}",
                num_embeddings=f.cardinality,
                embedding_dim=dim,
                feature_names=[f.name],
            )
            for f in meta.sparse
        ],
        device=torch.device("meta"),
    )
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=len(meta.dense),
        dense_arch_layer_sizes=[*DLRM_BOTTOM, dim],
        over_arch_layer_sizes=[*DLRM_TOP, 1],
    )
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": table_lr})
    constraints = {
        f"t_{f.name}": ParameterConstraints(
            sharding_types=[ShardingType.TABLE_WISE.value], compute_kernels=["fused"]
        )
        for f in meta.sparse
    }
    plan = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints
    ).collective_plan(model, None, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"),
        plan=plan,
    )
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    adam = torch.optim.Adam(dense, lr=lr)

    def step(batch: object) -> float:
        dmp.train()
        logits = dmp(batch.dense_features, batch.sparse_features).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        adam.zero_grad()
        loss.backward()
        adam.step()
        return loss.item()

    return step


def _loop_stepper(trainer: object, loader: object, steps: int) -> Callable[[object], float]:
    """A ``timed_steps`` stepper that ignores its batch and trains on ``loader``'s next one
    instead (the loader's work inside the timing)."""
    state = {"batches": iter(())}

    def step(_: object) -> float:
        batch = next(state["batches"], None)
        if batch is None:
            state["batches"] = iter(loader.epoch(len(state) + 1))
            batch = next(state["batches"])
        return trainer.train_step(batch)

    return step


@section("vs_torchrec", default=False)
def bench_vs_torchrec(args: argparse.Namespace) -> dict:
    """Training throughput: ctr DLRM (full, and hash at 10x) vs TorchRec's DLRM under DMP."""
    import statistics

    from ctr.run import RunConfig, build_run_model
    from ctr.trainer import TrainConfig, Trainer, table_modules
    from datasets.format import DatasetMeta
    from datasets.loader import BatchLoader

    rows_out, repeats, steps = [], 3, 20
    for scale in VS_TORCHREC_SCALES.values():
        # min_count=1: the vocabularies (every generated value keeps its id).
        data = default_dataset(args, rows=args.rows or 300_000, scale=scale, min_count=1)
        meta = DatasetMeta.load(data)
        label = f"{sum(f.cardinality for f in meta.sparse) / 1000:,.0f}k ids"
        loader = BatchLoader(meta, "train", batch_size=4096, shuffle=True, drop_last=True)
        batches = [b for _, b in zip(range(steps + 1), loader.epoch(0), strict=False)]
        config = TrainConfig(progress=False)
        steppers = {
            "torchrec_dmp": _torchrec_dlrm_step(meta, config.lr, config.table_lr),
        }
        for method, budget in (("full", "1x"), ("hash", "10x")):
            run = RunConfig(
                data=str(data),
                model="dlrm",
                model_options={"bottom": DLRM_BOTTOM, "top": DLRM_TOP},
                compressor=method,
                budget=budget,
                train=config,
            )
            trainer = Trainer(build_run_model(run, meta), loader, loader, config)
            steppers[f"ctr_{method}"] = trainer.train_step
            if method == "full":  # the same, through TorchRec's FusedEmbeddingBagCollection.forward
                reference = Trainer(build_run_model(run, meta), loader, loader, config)
                for tables in table_modules(reference.model):
                    tables._direct = None
                steppers["ctr_full_via_fused_ebc_forward"] = reference.train_step
        # ctr's whole loop, batches assembled by the loader inside the timing (as `ctr train`
        # sees them), without and with the background prefetch thread.
        loop_trainer = Trainer(
            build_run_model(
                RunConfig(
                    **{**run.to_json(), "compressor": "full", "budget": "1x", "train": config}
                ),
                meta,
            ),
            loader,
            loader,
            config,
        )
        for depth in (0, 2):
            feeding = BatchLoader(
                meta, "train", batch_size=4096, shuffle=True, drop_last=True, prefetch=depth
            )
            steppers[f"ctr_full_with_loader_prefetch{depth}"] = _loop_stepper(
                loop_trainer, feeding, steps
            )
        speeds: dict[str, list[float]] = {k: [] for k in steppers}
        for r in range(repeats):  # interleaved: drift on a shared machine hits every side alike
            for name, step in steppers.items():
                speeds[name].append(timed_steps(step, batches))
            print(
                f"  {label}: repeat {r + 1}/{repeats} "
                + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in speeds.items()),
                flush=True,
            )
        med = {k: statistics.median(v) for k, v in speeds.items()}
        for name in (
            "ctr_full",
            "ctr_hash",
            "ctr_full_via_fused_ebc_forward",
            "ctr_full_with_loader_prefetch0",
            "ctr_full_with_loader_prefetch2",
        ):
            rows_out.append(
                {
                    "ids": label,
                    "ctr": name.removeprefix("ctr_"),
                    "ctr samples/s": med[name],
                    "torchrec DMP samples/s": med["torchrec_dmp"],
                    "ratio": med[name] / med["torchrec_dmp"],
                }
            )
    print_table(
        f"vs_torchrec: DLRM bottom {DLRM_BOTTOM} top {DLRM_TOP}, batch 4096, D=16, median of "
        f"{repeats} interleaved repeats of {steps} steps (same batches, fused rowwise Adagrad)",
        rows_out,
    )
    return {"rows": rows_out, "repeats": repeats, "steps": steps}


@section("profile_step", default=False)
def bench_profile_step(args: argparse.Namespace) -> dict:
    """Top ops by self CPU time of ctr's DLRM train step (torch.profiler), with the fused
    tables called directly and through TorchRec's FusedEmbeddingBagCollection.forward."""
    from torch.profiler import ProfilerActivity, profile

    from ctr.run import RunConfig, build_run_model
    from ctr.trainer import TrainConfig, Trainer, table_modules
    from datasets.format import DatasetMeta
    from datasets.loader import BatchLoader

    data = default_dataset(
        args, rows=args.rows or 300_000, scale=VS_TORCHREC_SCALES["large"], min_count=1
    )
    meta = DatasetMeta.load(data)
    loader = BatchLoader(meta, "train", batch_size=4096, shuffle=True, drop_last=True)
    batches = [b for _, b in zip(range(12), loader.epoch(0), strict=False)]
    run = RunConfig(
        data=str(data), model="dlrm", model_options={"bottom": DLRM_BOTTOM, "top": DLRM_TOP}
    )
    trainer = Trainer(build_run_model(run, meta), loader, loader, TrainConfig(progress=False))
    direct = [t._direct for t in table_modules(trainer.model)]
    tables: dict[str, str] = {}
    for mode in ("torchrec_forward", "direct"):
        for t, d in zip(table_modules(trainer.model), direct, strict=True):
            t._direct = None if mode == "torchrec_forward" else d
        for b in batches[:2]:
            trainer.train_step(b)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[2:]:
                trainer.train_step(b)
        tables[mode] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50
        )
        print(f"profile_step: {mode}, {len(batches) - 2} steps\n{tables[mode]}")
    return {"tables": tables}


@section("dmp_scaling", default=False)
def bench_dmp_scaling(args: argparse.Namespace) -> dict:
    """Two-process DMP training (torchrun, gloo, 1 thread per rank) vs one process (2 threads)."""
    import subprocess

    data = default_dataset(args, rows=args.rows or 300_000)
    results: dict[str, float] = {}
    for procs in (1, 2):
        out = CACHE / "runs" / f"dmp-scaling-{procs}"
        if out.exists():
            import shutil

            shutil.rmtree(out)  # the bench's own scratch run
        train = ["train", "--data", str(data), "--model", "dlrm", "--epochs", "0.5"]
        train += ["--batch-size", "4096", "--no-progress", "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs)}
        if procs == 1:
            cmd = [sys.executable, "-m", "ctr.cli", *train]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            cmd += ["-m", "ctr.cli", *train]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        results[f"{procs} process(es)"] = json.loads((out / "summary.json").read_text())[
            "samples_per_sec"
        ]
    ratio = results["2 process(es)"] / results["1 process(es)"]
    rows = [{"setup": k, "samples/s": v} for k, v in results.items()]
    rows.append({"setup": "ratio 2 / 1", "samples/s": ratio})
    print_table("dmp_scaling: DLRM + full, batch 4096 (global), 0.5 epoch", rows)
    return {"samples_per_sec": results, "ratio": ratio}


# Few values per field (tests/conftest.py's learn_data): the setting of the TT/ROBE/DHE claim.
SMALL_CARDINALITIES = (40, 120, 600, 25, 300, 80, 15, 1000)


@section("table_less_claim", default=False)
def bench_table_less_claim(args: argparse.Namespace) -> dict:
    """TT-Rec/ROBE/DHE vs same-size hashing at 20x, fair protocol, 3 seeds, lr grid."""
    data = default_dataset(args, rows=400_000, cardinalities=SMALL_CARDINALITIES, num_dense=4)
    seeds = [0, 1, 2]
    methods = ["hash", "tt", "robe", "dhe"]
    results = protocol_sweep(
        "table_less_claim",
        args,
        data=[str(data)],
        methods=methods,
        budgets=["20x"],
        seeds=seeds,
        model_options={"hidden": [32]},
        protocol={"table_lrs": [0.02, 0.05, 0.15], "embedding_l2s": [0.0], "epochs": 2},
    )
    base = seed_stats(results, "hash", "20x")
    rows, verdicts = [], []
    for method in methods:
        st = seed_stats(results, method, "20x")
        if st is None:
            continue
        margin = None if base is None else st["mean"] - base["mean"]
        rows.append(
            {
                "method": method,
                "serve_bytes": st["bytes"],
                "mean_test_auc": st["mean"],
                "seed_aucs": " ".join(f"{a:.4f}" for a in st["aucs"]),
                "vs_hash": margin,
            }
        )
        if method != "hash" and base is not None:
            beyond = margin > max(st["spread"], base["spread"])
            verb = "beats" if beyond else "does not beat"
            verdicts.append(f"{method} {verb} hash beyond the seed spread ({margin:+.4f})")
    print_table("table_less_claim: DeepFM, small-vocabulary synthetic data, 20x, 3 seeds", rows)
    for v in verdicts:
        print(" ", v)
    return {"rows": rows, "verdicts": verdicts, "seeds": seeds}


ALL_BUDGETS = ("2x", "10x", "100x", "1000x")


@section("fair_sweep", default=False)
def bench_fair_sweep(args: argparse.Namespace) -> dict:
    """`ctr sweep` over the default data: methods x 2x/10x/100x/1000x x seeds, tuned full."""
    import compressors

    data = default_dataset(args)
    methods = args.methods.split(",") if args.methods else compressors.available()
    budgets = args.budgets.split(",") if args.budgets else list(ALL_BUDGETS)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [0, 1, 2]
    start = time.perf_counter()
    results = protocol_sweep(
        f"fair_sweep-{len(methods)}m-{len(budgets)}b-{len(seeds)}s",
        args,
        data=[str(data)],
        methods=methods,
        budgets=budgets,
        seeds=seeds,
    )
    return {"cells": len(results), "wall_s": time.perf_counter() - start, "results": results}


SEARCH_METHODS = (
    "hash",
    "unified",
    "tt",
    "robe",
    "optembed",
    "pep",
    "deeplight",
    "dnis",
    "mde",
    "autodim",
)


@section("search_backends", default=False)
def bench_search_backends(args: argparse.Namespace) -> dict:
    """Pruning and dimension search against hashing at equal bytes, as a new user runs them:
    ``ctr train`` defaults (1 epoch, batch 1024, each method's table optimiser as
    ``--table-optimizer auto`` picks it; ``--grid-optimizers rowwise_adagrad`` puts every
    method on fbgemm's rowwise Adagrad instead) on the default data (``ctr synth --rows
    200000``), at 2x/5x/10x (``--budgets``), ``--seeds`` (default 0): test AUC (mean ± std),
    the gap to ``hash`` at the same budget, wall time against ``full``'s and each stage's.
    Under the fair protocol instead: ``--only fair_sweep --methods ... --grid-optimizers
    rowwise_adagrad,adam``."""
    from compressors.core.budget import BudgetError
    from compressors.core.registry import COMPRESSORS
    from ctr.trainer import DEFAULT_TABLE_LRS

    data = default_dataset(args, rows=getattr(args, "rows", None) or 200_000)
    forced = args.grid_optimizers.split(",")[0] if args.grid_optimizers else None
    methods = args.methods.split(",") if args.methods else list(SEARCH_METHODS)
    budgets = args.budgets.split(",") if args.budgets else ["2x", "5x", "10x"]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [0]
    base = {"data": str(data), "model": "deepfm", "dim": 16}

    def run(method: str, budget: str, seed: int) -> dict | None:
        # What `ctr train --table-optimizer auto` picks (TrainConfig's own default is
        # rowwise Adagrad for every method).
        optimizer = forced or COMPRESSORS[method].default_optimizer
        train = {
            "epochs": 1.0,
            "batch_size": 1024,
            "seed": seed,
            "table_optimizer": optimizer,
            "table_lr": DEFAULT_TABLE_LRS[optimizer],
        }
        suffix = "" if optimizer == "rowwise_adagrad" else f"-{optimizer}"
        try:
            return cached_run(
                f"search-{method}-{budget}{suffix}-s{seed}",
                **base,
                compressor=method,
                budget=budget,
                train=train,
            )
        except BudgetError as e:
            print(f"  {method} @ {budget}: {e}")
            return None

    fulls = [run("full", "1x", s) for s in seeds]
    full_wall = sum(f["wall_seconds"] for f in fulls) / len(fulls)
    rows = [
        {
            "method": "full",
            "budget": "1x",
            "test_auc": _mean_std([f["test_auc"] for f in fulls]),
            "vs_hash": "",
            "wall_vs_full": 1.0,
            "stages_s": "",
        }
    ]
    table: dict[tuple[str, str], list[dict]] = {}
    for budget in budgets:
        for method in ["hash", *[m for m in methods if m != "hash"]]:
            runs = [r for r in (run(method, budget, s) for s in seeds) if r is not None]
            if runs:
                table[method, budget] = runs
    for (method, budget), runs in table.items():
        aucs = [r["test_auc"] for r in runs]
        hashed = [r["test_auc"] for r in table.get(("hash", budget), [])]
        stages = runs[0].get("stage_seconds", {})
        rows.append(
            {
                "method": method,
                "budget": budget,
                "test_auc": _mean_std(aucs),
                "vs_hash": f"{sum(aucs) / len(aucs) - sum(hashed) / len(hashed):+.4f}"
                if hashed
                else "",
                "wall_vs_full": sum(r["wall_seconds"] for r in runs) / len(runs) / full_wall,
                "stages_s": " ".join(f"{k}={v:.0f}" for k, v in stages.items()),
            }
        )
    how = f"every table on {forced}" if forced else "ctr train defaults"
    print_table(f"search backends, {how}, seeds {seeds}", rows)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated sections to run")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    parser.add_argument(
        "--rows", type=int, default=None, help="override dataset rows where a section uses them"
    )
    sweep = parser.add_argument_group("protocol sweeps (inter_feature, *_claim, fair_sweep)")
    sweep.add_argument(
        "--methods", default="", help="fair_sweep, dimension: methods (default: all)"
    )
    sweep.add_argument(
        "--budgets", default="", help="fair_sweep, dimension: comma-separated budgets"
    )
    sweep.add_argument("--storages", default="", help="dimension: comma-separated dtypes")
    sweep.add_argument(
        "--seeds", default="", help="fair_sweep: seeds (default 0,1,2); dimension (default 0)"
    )
    sweep.add_argument("--grid-lrs", default="", help="embedding lr grid, comma-separated")
    sweep.add_argument("--grid-l2s", default="", help="embedding L2 grid, comma-separated")
    sweep.add_argument(
        "--grid-optimizers",
        default="",
        help="embedding optimisers as a grid axis, comma-separated (rowwise_adagrad,adam)",
    )
    sweep.add_argument("--sweep-epochs", type=float, default=None, help="max epochs per point")
    sweep.add_argument("--workers", type=int, default=1, help="parallel cell processes")
    # serving's load generator: its spec (JSON) on stdin, its figures (JSON) on stdout
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loadgen:
        import asyncio

        print(json.dumps(asyncio.run(_load_clients(json.loads(sys.stdin.read())))))
        return 0
    if args.list:
        for name, (fn, default) in SECTIONS.items():
            summary = (fn.__doc__ or "").strip().splitlines()[0]
            print(f"{name:14s} {'(default) ' if default else ''}{summary}")
        return 0
    names = [n for n in args.only.split(",") if n] or [n for n, (_, d) in SECTIONS.items() if d]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {sorted(SECTIONS)}")
    (CACHE / "results").mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        result = SECTIONS[name][0](args)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        path = CACHE / "results" / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, path)
        print(f"[{name}] done in {result['wall_s']} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
