"""``ctr sweep run`` and ``ctr sweep report`` (the engine is :mod:`ctr.sweep`)."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctr.cli.common import HelpFormatter, field_default, parse_budget

if TYPE_CHECKING:
    from ctr.sweep.spec import SweepSpec

HELP = {"sweep": "fair memory-accuracy sweeps and their report"}
EXAMPLES = """examples:
  ctr sweep run --data data/synth --methods hash,tt,robe --budgets 10x,100x --seeds 0,1,2 \\
                --out sweeps/synth --workers 2
  ctr sweep run --spec sweep.json --out sweeps/synth      # a JSON (or YAML) SweepSpec
  ctr sweep run --spec sweep.json --out sweeps/synth --executor ray --address ray://head:10001
  ctr sweep report sweeps/synth                           # -> sweeps/synth/report/
  ctr sweep report sweeps/a sweeps/b --out sweeps/ab      # one report of several
Rerunning the same `ctr sweep run` resumes: finished cells are kept, an interrupted one
continues from its checkpoint.
"""
# Protocol fields set by a comma-separated flag (field: flag, element type); setting one
# drops an explicit grid.
PROTOCOL_LIST_FLAGS = {
    "table_lrs": ("lrs", float),
    "embedding_l2s": ("l2s", float),
    "optimizers": ("optimizers", str),
}
# Protocol fields set by their own flag (--epochs, --evals-per-epoch, ...): type, help.
PROTOCOL_FLAGS = {
    "epochs": (float, "max epochs per grid point"),
    "evals_per_epoch": (int, "evaluations per epoch"),
    "patience": (int, "evaluations without improvement to stop a grid point"),
    "batch_size": (int, "0: >= 200 steps per epoch"),
}


def epilog() -> str:
    """The examples, then every spec field (read from the dataclasses) and its flag."""
    from ctr.sweep.spec import ProtocolConfig, SweepSpec

    spec = [f.name for f in fields(SweepSpec) if f.name != "protocol"]
    protocol = [
        f.name + (f" (--{PROTOCOL_LIST_FLAGS[f.name][0]})" if f.name in PROTOCOL_LIST_FLAGS else "")
        for f in fields(ProtocolConfig)
    ]
    text = (
        "Spec fields (flags override them; docs/sweep-spec.md): "
        f"{', '.join(spec)}, protocol.{{{', '.join(protocol)}}}."
    )
    return EXAMPLES + textwrap.fill(text, 92, break_on_hyphens=False)


def _shown(value: Any) -> str:
    return (
        ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        if isinstance(value, list)
        else str(value)
    )


def _list(text: str | None, cast: Any = str) -> list[Any] | None:
    if text is None:
        return None
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    from ctr.sweep.spec import SweepSpec

    raw: dict[str, Any] = SweepSpec.load(args.spec).to_json() if args.spec else {}
    overrides = {
        "data": _list(args.data),
        "models": _list(args.models),
        "methods": _list(args.methods),
        "budgets": _list(args.budgets, parse_budget),
        "seeds": _list(args.seeds, int),
        "dim": args.dim,
    }
    raw.update({k: v for k, v in overrides.items() if v is not None})
    protocol = raw.setdefault("protocol", {})
    for key, (flag, cast) in PROTOCOL_LIST_FLAGS.items():
        value = _list(getattr(args, flag), cast)
        if value is not None:
            protocol[key] = value
            protocol["grid"] = []
    for key in PROTOCOL_FLAGS:
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


def add_parsers(sub: Any) -> None:
    from ctr.sweep.spec import ProtocolConfig, SweepSpec

    fmt = HelpFormatter
    p = sub.add_parser("sweep", help=HELP["sweep"], epilog=epilog(), formatter_class=fmt)
    actions = p.add_subparsers(dest="sweep_command", required=True)
    r = actions.add_parser(
        "run",
        help="train every cell of a sweep (resumable)",
        epilog=epilog(),
        formatter_class=fmt,
    )
    r.add_argument("--spec", type=Path, help="JSON/YAML SweepSpec; flags override its fields")

    def spec_default(name: str) -> str:
        return _shown(field_default(SweepSpec, name))

    def protocol_default(name: str) -> str:
        return _shown(field_default(ProtocolConfig, name))

    # None leaves the spec's value; the defaults named in the help are the dataclasses'.
    r.add_argument("--data", help="prepared dataset dir(s), comma-separated")
    r.add_argument("--models", help=f"models, comma-separated (default {spec_default('models')})")
    r.add_argument(
        "--methods",
        help=f"methods, comma-separated (see `ctr methods`; default {spec_default('methods')})",
    )
    r.add_argument(
        "--budgets",
        help=f"budgets, comma-separated, e.g. 10x,100x (default {spec_default('budgets')})",
    )
    r.add_argument(
        "--seeds", help=f"seeds, comma-separated, e.g. 0,1,2 (default {spec_default('seeds')})"
    )
    r.add_argument(
        "--dim", type=int, default=None, help=f"embedding dim (default {spec_default('dim')})"
    )
    adam = _shown(field_default(ProtocolConfig, "optimizer_lrs")["adam"])
    optimizer = field_default(ProtocolConfig, "optimizer")
    r.add_argument(
        "--lrs",
        help="grid of embedding learning rates, comma-separated (of the protocol's optimizer, "
        f"{optimizer}; Adam takes protocol.optimizer_lrs unless --optimizers leaves it out; "
        f"default {protocol_default('table_lrs')})",
    )
    r.add_argument(
        "--l2s",
        help="grid of embedding L2 rates, comma-separated "
        f"(default {protocol_default('embedding_l2s')})",
    )
    r.add_argument(
        "--optimizers",
        help="embedding optimizers as a grid axis, comma-separated "
        f"(default {protocol_default('optimizers')}); each takes its lrs from the spec's "
        f"protocol.optimizer_lrs (adam: {adam}), else --lrs",
    )
    for name, (cast, text) in PROTOCOL_FLAGS.items():
        r.add_argument(
            f"--{name.replace('_', '-')}",
            type=cast,
            default=None,
            help=f"{text} (default {protocol_default(name)})",
        )
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
