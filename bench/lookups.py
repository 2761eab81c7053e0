"""Lookup-speed sections: ``lookup_speed`` (the table-less methods' layer step and serving
time against full) and ``precision`` (serving lookups per format, and each format's AUC at its
natural ratio); also the serving-module builders the ``serving`` section times."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from bench.common import CACHE, cached_run, default_dataset, print_table
from compressors import (
    CODEBOOK_KIND,
    BinaryServing,
    CodebookPlan,
    CodebookServing,
    ExportedEmbedding,
    Lookup,
    RemapMap,
    ServeTables,
    Stage,
    TableSpec,
    binarize,
    binary_export,
    build_bitmap,
    build_compressor,
    build_remap,
    build_serving,
    pack_codes,
    pack_rows,
)
from ctr.embedding import features_from_dataset
from ctr.serving.compact import CompactModel
from ctr.serving.export import export
from ctr.training.metrics import auc_logloss
from ctr.training.run import RunConfig, build_run_model, load_run_model
from ctr.training.trainer import table_modules
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta


def bench_lookup_speed(args: argparse.Namespace) -> dict:
    """Embedding-layer step and serving time of the table-less methods vs full, side by side."""

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


PRECISION_DTYPES = ("fp32", "fp16", "int8", "int4", "int2")


def _serving_tables(cards: list[int], dim: int, seed: int = 0) -> dict[str, object]:
    """The same random tables behind every serving format: fbgemm's int-N TBE per dtype and
    the binary module at b=1 and b=4 (built one format at a time to bound memory)."""
    modules = int_tables(cards, dim, seed)
    modules.update(binary_tables(cards, dim, (1, 4), seed))
    return modules


def _random_tables(cards: list[int], dim: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for n in cards:
        yield torch.randn(n, dim, generator=gen) * 0.1


def int_tables(cards: list[int], dim: int, seed: int, dtypes=PRECISION_DTYPES) -> dict:
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


def binary_tables(
    cards: list[int],
    dim: int,
    bits: Sequence[int],
    seed: int = 0,
    decodes: Sequence[tuple[str, str]] = (("auto", "int2"),),
) -> dict:
    """Binary serving modules over the same random tables: one per plane count and
    ``(decode, plane dtype)``, keyed ``binary b=B DECODE[/DTYPE]``."""
    names = [f"C{i + 1}" for i in range(len(cards))]
    modules: dict[str, object] = {}
    for b in bits:
        parts = [binarize(w, b) for w in _random_tables(cards, dim, seed)]
        exported = binary_export(names, dim, [c for c, _ in parts], [s for _, s in parts])
        for decode, plane_dtype in decodes:
            label = f"binary b={b} {decode}" + (f"/{plane_dtype}" if decode == "planes" else "")
            modules[label] = BinaryServing(exported, decode, plane_dtype)
    return modules


def codebook_tables(cards: list[int], dim: int, seed: int = 0) -> dict:
    """Codebook serving modules (dpq/mgqe's export format) with random codes and values,
    keyed by their setting; ``serve_bytes`` is the artifact's size, ``resident_bytes`` what
    the loaded module holds."""

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
        module = CodebookServing(ExportedEmbedding(CODEBOOK_KIND, config, tensors))
        module.serve_bytes = plan.serve_bytes
        modules[label] = module
    return modules


def pruned_index_tables(cards: list[int], dim: int, keep: float, seed: int = 0) -> dict:
    """fp32 lookups of the same kept rows (a random ``keep`` fraction of each field) behind
    the two index forms a pruned export picks from: an id -> row array (int16/int32 per id)
    and a rank bitmap (2.5 bits per id); plus the unpruned table. The ratio isolates what
    the index costs a lookup."""

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
    modules: dict[str, object] = int_tables(cards, dim, seed, ("fp32",))
    for form, index in forms.items():
        module = nn.Sequential(index, ServeTables(specs, lookups, kept))
        module.index_bytes = sum(t.numel() * t.element_size() for t in index.tensors().values())
        modules[f"pruned {form}"] = module
    return modules


def lookup_rates(modules: dict[str, object], batches: list, repeats: int = 5) -> dict[str, float]:
    """Lookups per CPU-second of each module over ``batches``, on one thread.

    Every batch is timed alone with the thread's CPU clock, modules interleaved batch by batch,
    and each batch's best of ``repeats`` summed: on a shared machine wall time mostly measures
    the other processes, and CPU time of a single thread does not.
    """
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


def bench_precision(args: argparse.Namespace) -> dict:
    """Precision family: serving lookup speed per format, AUC/logloss at each natural ratio."""

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
        speeds = lookup_rates(_serving_tables(tables, dim), batches)
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
