"""``ctr sweep run`` and ``ctr sweep report`` (the engine is :mod:`ctr.sweep`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

EPILOG_SWEEP = """examples:
  ctr sweep run --data data/synth --methods hash,tt,robe --budgets 10x,100x --seeds 0,1,2 \\
                --out sweeps/synth --workers 2
  ctr sweep run --spec sweep.json --out sweeps/synth      # a JSON (or YAML) SweepSpec
  ctr sweep run --spec sweep.json --out sweeps/synth --executor ray --address ray://head:10001
  ctr sweep report sweeps/synth                           # -> sweeps/synth/report/
  ctr sweep report sweeps/a sweeps/b --out sweeps/ab      # one report of several
Rerunning the same `ctr sweep run` resumes: finished cells are kept, an interrupted one
continues from its checkpoint.
Spec fields (flags override them; docs/sweep-spec.md): data, models, methods, budgets, seeds,
dim, model_options, method_options, reference, protocol.{table_lrs (--lrs), embedding_l2s
(--l2s), grid, optimizer, optimizers (--optimizers), optimizer_lrs, l2_mode, epochs,
evals_per_epoch, patience, lr_decay, dense_lr, batch_size, eval_batch_size}."""


def _list(text: str | None, cast: Any = str) -> list[Any] | None:
    if text is None:
        return None
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def _budget(text: str) -> str | int | float:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def spec_from_args(args: argparse.Namespace) -> Any:
    from ctr.sweep import SweepSpec

    raw: dict[str, Any] = SweepSpec.load(args.spec).to_json() if args.spec else {}
    overrides = {
        "data": _list(args.data),
        "models": _list(args.models),
        "methods": _list(args.methods),
        "budgets": _list(args.budgets, _budget),
        "seeds": _list(args.seeds, int),
        "dim": args.dim,
    }
    raw.update({k: v for k, v in overrides.items() if v is not None})
    protocol = raw.setdefault("protocol", {})
    for flag, key, cast in (
        ("lrs", "table_lrs", float),
        ("l2s", "embedding_l2s", float),
        ("optimizers", "optimizers", str),
    ):
        value = _list(getattr(args, flag), cast)
        if value is not None:
            protocol[key] = value
            protocol["grid"] = []
    for key in ("epochs", "evals_per_epoch", "patience", "batch_size"):
        value = getattr(args, key)
        if value is not None:
            protocol[key] = value
    if not raw.get("data"):
        raise SystemExit("ctr sweep run: give --data DIR[,DIR...] or a --spec file with 'data'")
    return SweepSpec.from_json(raw, str(args.spec or "flags"))


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from ctr.sweep import run_cells

    spec = spec_from_args(args)
    started = time.perf_counter()
    results = run_cells(
        spec,
        args.out,
        workers=args.workers,
        executor=args.executor,
        address=args.address,
        threads=args.threads,
    )
    done = sum(r.done for r in results)
    print(
        f"sweep finished in {time.perf_counter() - started:.0f}s: {done} cells trained, "
        f"{len(results) - done} infeasible -> {args.out} (ctr sweep report {args.out})"
    )
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from ctr.sweep import write_report

    try:
        paths = write_report(args.sweep, args.out, overwrite=args.overwrite)
    except ValueError as e:
        print(f"ctr sweep report: error: {e}", file=sys.stderr)
        return 2
    print(Path(paths["markdown"]).read_text())
    pngs = ", ".join(str(p) for p in paths["png"])
    print(f"wrote {paths['csv']}, {paths['parquet']}, {paths['markdown']}, {pngs}")
    return 0


def add_sweep_parser(sub: Any) -> None:
    from ctr.cli import HelpFormatter

    fmt = HelpFormatter
    p = sub.add_parser(
        "sweep",
        help="fair memory-accuracy sweeps and their report",
        epilog=EPILOG_SWEEP,
        formatter_class=fmt,
    )
    actions = p.add_subparsers(dest="sweep_command", required=True)
    r = actions.add_parser(
        "run",
        help="train every cell of a sweep (resumable)",
        epilog=EPILOG_SWEEP,
        formatter_class=fmt,
    )
    r.add_argument("--spec", type=Path, help="JSON/YAML SweepSpec; flags override its fields")
    r.add_argument("--data", help="prepared dataset dir(s), comma-separated")
    r.add_argument("--models", help="models, comma-separated (default deepfm)")
    r.add_argument("--methods", help="methods, comma-separated (see `ctr methods`)")
    r.add_argument("--budgets", help="budgets, comma-separated, e.g. 10x,100x")
    r.add_argument("--seeds", help="seeds, comma-separated, e.g. 0,1,2")
    r.add_argument("--dim", type=int, default=None, help="embedding dim (default 16)")
    r.add_argument(
        "--lrs",
        help="grid of embedding learning rates, comma-separated (of the protocol's optimizer, "
        "rowwise_adagrad; Adam takes protocol.optimizer_lrs unless --optimizers leaves it out)",
    )
    r.add_argument("--l2s", help="grid of embedding L2 rates, comma-separated")
    r.add_argument(
        "--optimizers",
        help="embedding optimizers as a grid axis, comma-separated (rowwise_adagrad,adam); "
        "each takes its lrs from the spec's protocol.optimizer_lrs (adam: 3e-4,1e-3,3e-3), "
        "else --lrs",
    )
    r.add_argument("--epochs", type=float, default=None, help="max epochs per grid point")
    r.add_argument("--evals-per-epoch", type=int, default=None)
    r.add_argument("--patience", type=int, default=None)
    r.add_argument("--batch-size", type=int, default=None, help="0: >= 200 steps per epoch")
    r.add_argument("--out", required=True, type=Path, help="sweep directory")
    r.add_argument("--workers", type=int, default=1, help="local worker processes")
    r.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    r.add_argument("--executor", default="local", choices=["local", "ray"], help="where cells run")
    r.add_argument(
        "--address", default=None, help="Ray cluster address ('local': a private local instance)"
    )
    r.set_defaults(func=cmd_sweep_run)
    rep = actions.add_parser("report", help="table, markdown summary and Pareto plot")
    rep.add_argument("sweep", type=Path, nargs="+", help="sweep directory (or several: one report)")
    rep.add_argument(
        "--out", type=Path, default=None, help="default: SWEEP/report (required for several)"
    )
    rep.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out that holds no earlier report (its report files "
        "are replaced; nothing else is touched)",
    )
    rep.set_defaults(func=cmd_sweep_report)
