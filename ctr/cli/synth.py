"""``ctr synth``: the synthetic Criteo-like dataset; the flags' defaults are
:class:`datasets.synthetic.SyntheticConfig`'s fields."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctr.cli.common import HelpFormatter, add_field

HELP = {"synth": "generate the synthetic Criteo-like dataset"}
EPILOG_SYNTH = """example:
  ctr synth --rows 1000000 --out data/synth
  ctr synth --rows 200000 --scale 0.001 --multi-hot 2 --out data/small"""

# Not SyntheticConfig's 1 (library callers keep every value): the command drops rare values
# as Criteo preparation does (see datasets.synthetic).
SYNTH_MIN_COUNT = 10


def add_parsers(sub: Any) -> None:
    from datasets.synthetic import SyntheticConfig

    p = sub.add_parser(
        "synth", help=HELP["synth"], epilog=EPILOG_SYNTH, formatter_class=HelpFormatter
    )
    add_field(p, SyntheticConfig, "rows", "total rows (80/10/10 split)")
    add_field(p, SyntheticConfig, "scale", "factor on Criteo's cardinalities")
    p.add_argument(
        "--multi-hot",
        dest="multi_hot",
        type=int,
        default=SyntheticConfig.multi_hot_fields,
        help="extra multi-hot fields",
    )
    add_field(p, SyntheticConfig, "seed", "seed of the data and its teacher")
    p.add_argument(
        "--min-count",
        type=int,
        default=SYNTH_MIN_COUNT,
        help="values seen fewer times in train map to the OOV id 0 (as Criteo preparation)",
    )
    p.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from datasets.synthetic import SyntheticConfig, generate_synthetic

    config = SyntheticConfig(
        rows=args.rows,
        scale=args.scale,
        multi_hot_fields=args.multi_hot,
        seed=args.seed,
        min_count=args.min_count,
    )
    meta = generate_synthetic(
        args.out, config, progress=not args.no_progress, overwrite=args.overwrite
    )
    teacher = meta.extra["teacher"]
    print(
        f"wrote {args.out}: {sum(s.rows for s in meta.splits.values()):,} rows, "
        f"{len(meta.sparse)} sparse fields ({sum(f.cardinality for f in meta.sparse):,} ids), "
        f"{len(meta.dense)} dense; teacher test AUC {teacher['test_auc']:.4f}"
    )
    return 0
