"""Sweeps and performance benchmarks, each reported as ratios measured side by side in one run.

``python bench.py`` runs the quick default sections; ``python bench.py --only preprocess``
runs named ones; ``python bench.py --list`` lists them. Every section prints a table and writes
its figures to ``.bench-cache/results/<section>.json``. The sections live in ``bench/``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable

from bench import gpu_smoke, loadgen, scale, scale_step

# name -> (module in bench/, function, runs by default). A section takes the parsed arguments
# and returns its figures (a JSON-able dict).
SECTIONS: dict[str, tuple[str, str, bool]] = {
    "train": ("training", "bench_train", True),
    "preprocess": ("preprocess", "bench_preprocess", False),
    "lookup_speed": ("lookups", "bench_lookup_speed", False),
    "precision": ("lookups", "bench_precision", False),
    "inter_feature": ("sweeps", "bench_inter_feature", False),
    "dimension": ("search", "bench_dimension", False),
    "dnis_kept": ("search", "bench_dnis_kept", False),
    "unified_claim": ("sweeps", "bench_unified_claim", False),
    "pruning": ("search", "bench_pruning", False),
    "serving": ("serving", "bench_serving", False),
    "vs_torchrec": ("training", "bench_vs_torchrec", False),
    "profile_step": ("training", "bench_profile_step", False),
    "dmp_scaling": ("training", "bench_dmp_scaling", False),
    "table_less_claim": ("sweeps", "bench_table_less_claim", False),
    "fair_sweep": ("sweeps", "bench_fair_sweep", False),
    "search_backends": ("search", "bench_search_backends", False),
    "scale": ("scale", "run", False),
    "scale_step": ("scale_step", "bench_scale_step", False),
    "gpu_smoke": ("gpu_smoke", "bench_gpu_smoke", False),
}


def section(name: str) -> Callable[[argparse.Namespace], dict]:
    """The function of section ``name``; its module is imported on demand, so ``--help`` and
    the load generator need no torch and a section runs without the others' imports."""
    module, function, _ = SECTIONS[name]
    return getattr(importlib.import_module(f"bench.{module}"), function)


def parser() -> argparse.ArgumentParser:
    listing = ", ".join(f"{n} (default)" if d else n for n, (_, _, d) in SECTIONS.items())
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog=f"sections: {listing}",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--only", default="", help="comma-separated sections to run")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    p.add_argument(
        "--rows", type=int, default=None, help="override dataset rows where a section uses them"
    )
    sweep = p.add_argument_group("protocol sweeps (inter_feature, *_claim, fair_sweep)")
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
    scale.add_arguments(p)  # light: the section imports torch in its children only
    scale_step.add_arguments(p)
    gpu_smoke.add_arguments(p)  # light: torch is imported when the section runs
    # serving's load generator: its spec (JSON) on stdin, its figures (JSON) on stdout
    p.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.loadgen:
        return loadgen.main()
    if args.list:
        for name, (_, _, default) in SECTIONS.items():
            summary = (section(name).__doc__ or "").strip().splitlines()[0]
            print(f"{name:14s} {'(default) ' if default else ''}{summary}")
        return 0
    names = [n for n in args.only.split(",") if n] or [n for n, s in SECTIONS.items() if s[2]]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        cli.error(f"unknown sections {unknown}; known: {sorted(SECTIONS)}")
    # Imported here: bench.common loads torch and ctr, which --help and --loadgen do not need.
    from bench.common import CACHE, write_result

    (CACHE / "results").mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        result = section(name)(args)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        path = write_result(name, result)
        if "skipped" not in result:  # a skipped section said so in its one line
            print(f"[{name}] done in {result['wall_s']} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
