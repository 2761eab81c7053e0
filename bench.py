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
from collections.abc import Callable
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
    """The plain-PyTorch baseline: ``nn.EmbeddingBag`` per field with sparse gradients and
    SparseAdam (the strongest plain setting), same first-order/FM/MLP as ``ctr``'s DeepFM."""

    def __init__(self, meta: object, dim: int, hidden: list[int], lr: float = 1e-3) -> None:
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
        self.opts = [torch.optim.SparseAdam(list(self.bags.parameters()), lr=lr),
                     torch.optim.Adam(dense, lr=lr)]

    def step(self, batch: object) -> float:
        import torch
        import torch.nn.functional as F

        from ctr.models.layers import fm_interaction

        kjt = batch.sparse_features
        emb = torch.stack(
            [bag(kjt[n].values(), kjt[n].offsets()[:-1]) for bag, n in zip(self.bags, self.names)],
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
    from ctr.trainer import Trainer, TrainConfig
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
    ours = Trainer(build_run_model(RunConfig(data=str(data))), loader,
                   BatchLoader(meta, "valid"), TrainConfig(progress=False))
    plain = PlainDeepFM(meta, 16, [400, 400, 400])
    speeds = {"ctr": [], "plain": []}
    for _ in range(2):  # interleaved, so drift on a shared machine hits both alike
        speeds["ctr"].append(timed_steps(ours.train_step, batches))
        speeds["plain"].append(timed_steps(plain.step, batches))
    ctr_sps, plain_sps = max(speeds["ctr"]), max(speeds["plain"])
    rows_out = [
        {"what": "DeepFM full test AUC", "value": summary["test_auc"]},
        {"what": "teacher test AUC (ceiling)", "value": teacher},
        {"what": "AUC gap to teacher", "value": teacher - summary["test_auc"]},
        {"what": "DeepFM full test logloss", "value": summary["test_logloss"]},
        {"what": "ctr train samples/s (fused fbgemm)", "value": ctr_sps},
        {"what": "plain PyTorch samples/s (SparseAdam)", "value": plain_sps},
        {"what": "throughput ratio ctr / plain", "value": ctr_sps / plain_sps},
        {"what": "loader rows/s (first epoch, decode)", "value": loader_cold},
        {"what": "loader rows/s (cached)", "value": loader_warm},
    ]
    print_table("train: DeepFM + full, default synthetic data", rows_out)
    return {"summary": summary, "teacher_auc": teacher, "ctr_samples_per_sec": ctr_sps,
            "plain_samples_per_sec": plain_sps, "ratio": ctr_sps / plain_sps,
            "loader_rows_per_sec_cold": loader_cold, "loader_rows_per_sec_warm": loader_warm}


# ---------------------------------------------------------------- inter-feature methods (issue 4)
INTER_FEATURE = ("hash", "unified", "qr", "tt", "robe", "dhe", "adapt")
INTER_FEATURE_BUDGETS = ("10x", "100x", "1000x")


def _fits(method: str, features: list, budget: str, **options: object) -> str | None:
    """None when ``method`` can be built at ``budget``, else the BudgetError's message."""
    from compressors import BudgetError, build_compressor

    try:
        build_compressor(method, features, 16, budget, **options)
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
    full = cached_run("deepfm-full-1x", data=str(data), model="deepfm", compressor="full")

    loader = BatchLoader(meta, "train", batch_size=4096, shuffle=True)
    batches = [b for _, b in zip(range(21), loader.epoch(7), strict=False)]

    def trainer(method: str, budget: str) -> Trainer:
        model = build_run_model(RunConfig(data=str(data), compressor=method, budget=budget))
        return Trainer(model, loader, BatchLoader(meta, "valid"), TrainConfig(progress=False))

    full_trainer = trainer("full", "1x")
    rows = [{"method": "full", "budget": "1x", "ratio": 1.0, "test_auc": full["test_auc"],
             "test_logloss": full["test_logloss"], "serve_bytes": full["serve_bytes"],
             "train_bytes": full["train_bytes"], "step_time_vs_full": 1.0, "note": ""}]
    for method in methods:
        for budget in INTER_FEATURE_BUDGETS:
            refused = _fits(method, features, budget)
            if refused:
                rows.append({"method": method, "budget": budget, "note": refused})
                continue
            summary = cached_run(f"deepfm-{method}-{budget}", data=str(data), model="deepfm",
                                 compressor=method, budget=budget)
            # Interleaved with full, best of two rounds each: drift on a shared machine hits
            # both alike.
            ours = trainer(method, budget)
            full_sps, our_sps = [], []
            for _ in range(2):
                full_sps.append(timed_steps(full_trainer.train_step, batches))
                our_sps.append(timed_steps(ours.train_step, batches))
            rows.append({
                "method": method, "budget": budget, "ratio": summary["ratio"],
                "test_auc": summary["test_auc"], "test_logloss": summary["test_logloss"],
                "serve_bytes": summary["serve_bytes"], "train_bytes": summary["train_bytes"],
                "step_time_vs_full": max(full_sps) / max(our_sps), "note": "",
            })
    print_table("inter_feature: DeepFM, default synthetic data, 1 epoch (teacher AUC "
                f"{meta.extra['teacher']['test_auc']:.4f})",
                [{k: v for k, v in r.items() if k != "note"} for r in rows if not r["note"]])
    for r in rows:
        if r["note"]:
            print(f"  {r['method']} at {r['budget']}: {r['note']}")
    plot = _pareto_plot(rows, CACHE / "results" / "inter_feature.png")
    return {"rows": rows, "methods": methods, "teacher_auc": meta.extra["teacher"]["test_auc"],
            "plot": str(plot)}


def _pareto_plot(rows: list[dict], path: Path) -> Path:
    """AUC against serve bytes (log x), one line per method, full as a reference point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["serve_bytes"], r["test_auc"]) for r in rows
                        if r["method"] == method and not r["note"])
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


CLAIM_VARIANTS = {"hash": ("hash", {}), "hash-shared": ("hash", {"shared": True}),
                  "unified": ("unified", {})}


@section("unified_claim", default=False)
def bench_unified_claim(args: argparse.Namespace) -> dict:
    """Unified Embedding's claim: multiplexed vs per-field hashing at equal bytes (2 seeds)."""
    from ctr.embedding import features_from_dataset
    from datasets.format import DatasetMeta

    data = default_dataset(args)
    features = features_from_dataset(DatasetMeta.load(data))
    seeds = (0, 1)
    rows, wins, compared = [], 0, 0
    for budget in INTER_FEATURE_BUDGETS:
        per_variant = {}
        for variant, (method, options) in CLAIM_VARIANTS.items():
            if _fits(method, features, budget, **options):
                continue
            aucs, size = [], 0
            for seed in seeds:
                # Seed 0 runs share their cache with the inter_feature section.
                name = f"deepfm-{variant}-{budget}" + (f"-seed{seed}" if seed else "")
                summary = cached_run(name, data=str(data), model="deepfm", compressor=method,
                                     budget=budget, method_options=options,
                                     train={"seed": seed} if seed else {})
                aucs.append(summary["test_auc"])
                size = summary["serve_bytes"]
            per_variant[variant] = (sum(aucs) / len(aucs), aucs, size)
        base = per_variant.get("hash", (None,))[0]
        for variant, (auc, aucs, size) in per_variant.items():
            rows.append({"budget": budget, "variant": variant, "serve_bytes": size,
                         "mean_test_auc": auc, "seed_aucs": " ".join(f"{a:.4f}" for a in aucs),
                         "vs_per_field_hash": None if base is None else auc - base})
        if "unified" in per_variant and base is not None:
            compared += 1
            # A win counts only beyond the seed-to-seed spread of either method.
            spread = max(max(a) - min(a) for _, a, _ in (per_variant["hash"],
                                                         per_variant["unified"]))
            wins += per_variant["unified"][0] - base > spread
    print_table("unified_claim: DeepFM, default synthetic data, 1 epoch, mean of 2 seeds", rows)
    verdict = (f"unified beats per-field hash beyond the seed spread at {wins} of {compared} "
               "budgets (the paper: multiplexing wins at equal bytes)")
    print(verdict)
    return {"rows": rows, "verdict": verdict, "seeds": list(seeds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated sections to run")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    parser.add_argument("--rows", type=int, default=None, help="override dataset rows where a section uses them")
    args = parser.parse_args(argv)
    if args.list:
        for name, (fn, default) in SECTIONS.items():
            print(f"{name:14s} {'(default) ' if default else ''}{(fn.__doc__ or '').strip().splitlines()[0]}")
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
