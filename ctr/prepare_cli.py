"""``ctr prepare {criteo,avazu,kdd12,movielens,table}``: the command-line face of preprocessing.

The main ``ctr`` CLI calls :func:`add_prepare_parser` on its subparsers and then
``args.func(args)``, which returns the exit code.

Example::

    parser = argparse.ArgumentParser(prog="ctr")
    add_prepare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", "criteo", "train.txt", "--out", "data/criteo"])
    sys.exit(args.func(args))
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from datasets.prepare.columns import DENSE_TRANSFORMS
from datasets.prepare.engine import BAD_ROW_POLICIES, PrepareOptions
from datasets.prepare.sources import BadInputError
from datasets.prepared import DatasetMeta
from datasets.readers.avazu import DEFAULT_MIN_COUNT as AVAZU_MIN_COUNT
from datasets.readers.avazu import prepare_avazu
from datasets.readers.criteo import DEFAULT_MIN_COUNT as CRITEO_MIN_COUNT
from datasets.readers.criteo import CriteoConfig, CriteoDays, prepare_criteo
from datasets.readers.kdd12 import DEFAULT_MIN_COUNT as KDD12_MIN_COUNT
from datasets.readers.kdd12 import LABEL_MODES, Kdd12Config, prepare_kdd12
from datasets.readers.movielens import MovieLensConfig, prepare_movielens
from datasets.readers.table import (
    NUMERIC_AS,
    TABLE_FORMATS,
    TableSchema,
    prepare_table,
    read_schema_file,
)

EXAMPLES = {
    "criteo": "ctr prepare criteo train.txt --out data/criteo --min-count 10\n"
    "  ctr prepare criteo day_{0..23}.gz --out data/criteo-tb --valid-days 23 "
    "--test-days 23",
    "avazu": "ctr prepare avazu train.csv --out data/avazu --split random --seed 0",
    "kdd12": "ctr prepare kdd12 track2/training.txt --out data/kdd12 --label binary",
    "movielens": "ctr prepare movielens ml-1m --out data/ml-1m --positive-rating 4",
    "table": "ctr prepare table logs.csv --out data/logs --schema schema.json\n"
    "  ctr prepare table logs.parquet --out data/logs --label clicked "
    "--categorical site,ad --numeric price --multi tags:'|'\n"
    "  ctr prepare table adult.data adult.test --out data/adult --format csv "
    "--columns age,workclass,fnlwgt,education,education-num,marital-status,occupation,"
    "relationship,race,sex,capital-gain,capital-loss,hours-per-week,native-country,income "
    "--label income --positive '>50K' --positive '>50K.' --negative '<=50K' "
    "--negative '<=50K.' --categorical workclass,education,marital-status,occupation,"
    "relationship,race,sex,native-country --numeric age,fnlwgt,education-num,capital-gain,"
    "capital-loss,hours-per-week --numeric-buckets 20 --numeric-as buckets",
}
HELP = {
    "criteo": "Criteo Kaggle train.txt or terabyte day_N files (TSV, plain or .gz)",
    "avazu": "Avazu train.csv (CSV with header; hour -> hour_of_day and weekday)",
    "kdd12": "KDD Cup 2012 track 2 training.txt (TSV; clicks vs impressions)",
    "movielens": "MovieLens ml-100k or ml-1m directory (ratings joined with users and movies)",
    "table": "any CSV/TSV/parquet with a schema (JSON file or flags)",
}


def add_prepare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``prepare`` and its per-format subcommands; each sets ``func`` -> exit code."""
    prepare = subparsers.add_parser(
        "prepare",
        help="turn a raw CTR dataset into the prepared format",
        description="Turn a raw CTR dataset into parquet shards + meta.json: two streaming "
        "passes, frequency-ordered ids (0 = OOV), bad rows counted and reported.",
    )
    formats = prepare.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name, adder in (
        ("criteo", _criteo),
        ("avazu", _avazu),
        ("kdd12", _kdd12),
        ("movielens", _movielens),
        ("table", _table),
    ):
        sub = formats.add_parser(
            name,
            help=HELP[name],
            description=HELP[name],
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        split_choices, min_count = adder(sub)
        _common(sub, split_choices, min_count)
        # Not `format`: `prepare table` has a --format flag that would shadow the name.
        sub.set_defaults(prepare_format=name)
    return prepare


def _common(p: argparse.ArgumentParser, split_choices: list[str], min_count: int) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--min-count",
        type=int,
        default=None,
        help=f"values seen fewer times in train become OOV (default {min_count})",
    )
    p.add_argument(
        "--split",
        choices=split_choices,
        default=None,
        help=f"how rows are split into train/valid/test (default: {split_choices[0]})",
    )
    p.add_argument(
        "--fractions",
        default="0.8,0.1,0.1",
        help="train,valid,test shares for --split random|ordered (default 0.8,0.1,0.1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random split")
    p.add_argument(
        "--on-bad-row",
        choices=BAD_ROW_POLICIES,
        default="skip",
        help="skip (and report) malformed rows, or fail at the first one",
    )
    p.add_argument(
        "--max-dropped-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="fail (and write no meta.json) when more than this share of the lines are bad "
        "rows, e.g. a truncated file of a join (default 0.05; 1 = never)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--block-mb", type=int, default=8, help="raw megabytes read per chunk (default 8)"
    )
    p.add_argument(
        "--rows-per-shard",
        type=int,
        default=1 << 20,
        help="rows per parquet shard (default 1048576)",
    )


def _criteo(p: argparse.ArgumentParser) -> tuple[list[str], int]:
    p.add_argument("paths", nargs="+", metavar="PATH", help="train.txt, or day_N files in order")
    p.add_argument(
        "--bucketize-dense",
        action="store_true",
        help="also add I1_bucket..I13_bucket categorical fields (floor(log(x)^2))",
    )
    for split in ("train", "valid", "test"):
        p.add_argument(
            f"--{split}-days",
            type=_day_list,
            default=None,
            metavar="DAYS",
            help=f"day files for {split}, e.g. 0-22 or 21,22 (numbers from day_N names)",
        )
    p.set_defaults(
        func=_run(
            lambda a, o: prepare_criteo(
                a.paths,
                a.out,
                CriteoConfig(bucketize_dense=a.bucketize_dense),
                CriteoDays(a.train_days, a.valid_days, a.test_days),
                o,
            )
        )
    )
    return ["days", "random", "ordered"], CRITEO_MIN_COUNT


def _avazu(p: argparse.ArgumentParser) -> tuple[list[str], int]:
    p.add_argument("paths", nargs="+", metavar="PATH", help="train.csv (plain or .gz)")
    p.set_defaults(func=_run(lambda a, o: prepare_avazu(a.paths, a.out, o)))
    return ["random", "ordered"], AVAZU_MIN_COUNT


def _kdd12(p: argparse.ArgumentParser) -> tuple[list[str], int]:
    p.add_argument("paths", nargs="+", metavar="PATH", help="training.txt (plain or .gz)")
    p.add_argument(
        "--label",
        choices=LABEL_MODES,
        default="expanded",
        help="expanded: one row per impression; binary: one row per line, click > 0",
    )
    p.set_defaults(func=_run(lambda a, o: prepare_kdd12(a.paths, a.out, Kdd12Config(a.label), o)))
    return ["random", "ordered"], KDD12_MIN_COUNT


def _movielens(p: argparse.ArgumentParser) -> tuple[list[str], int]:
    p.add_argument("path", metavar="DIR", help="unpacked ml-100k or ml-1m directory")
    p.add_argument(
        "--positive-rating",
        type=float,
        default=4.0,
        help="ratings at or above this are positives (default 4)",
    )
    p.add_argument("--no-year", action="store_true", help="no year field from the titles")
    p.set_defaults(
        func=_run(
            lambda a, o: prepare_movielens(
                a.path, a.out, MovieLensConfig(a.positive_rating, year=not a.no_year), o
            )
        )
    )
    return ["random", "ordered"], 1


def _table(p: argparse.ArgumentParser) -> tuple[list[str], int]:
    p.add_argument("paths", nargs="+", metavar="PATH", help="CSV / TSV / parquet files")
    p.add_argument("--schema", help="JSON schema file (flags below override its entries)")
    p.add_argument("--label", help="label column (0/1, a probability, or text: see --positive)")
    p.add_argument(
        "--positive",
        action="append",
        metavar="VALUE",
        help="label text meaning 1, e.g. '>50K' (repeatable; needs --negative; other values "
        "are bad rows)",
    )
    p.add_argument(
        "--negative",
        action="append",
        metavar="VALUE",
        help="label text meaning 0, e.g. '<=50K' (repeatable)",
    )
    p.add_argument("--categorical", type=_names, help="comma-separated categorical columns")
    p.add_argument("--numeric", type=_names, help="comma-separated numeric columns")
    p.add_argument(
        "--multi",
        action="append",
        type=_multi,
        metavar="COL:SEP",
        help="multi-valued column and its separator, e.g. tags:'|' (repeatable)",
    )
    p.add_argument("--format", choices=sorted(TABLE_FORMATS), help="default: from the file name")
    p.add_argument("--delimiter", help="field delimiter of text files (default per format)")
    p.add_argument(
        "--columns",
        type=_names,
        help="comma-separated column names of text files without a header line",
    )
    p.add_argument(
        "--numeric-transform",
        choices=sorted(DENSE_TRANSFORMS),
        help="transform of numeric columns (default signed_log1p)",
    )
    p.add_argument(
        "--numeric-buckets",
        type=int,
        metavar="N",
        help="also give each numeric column COL a categorical field COL_bucket: N "
        "equal-frequency buckets from the train split (0 its own bucket when it is the "
        "most frequent value)",
    )
    p.add_argument(
        "--numeric-as",
        choices=NUMERIC_AS,
        help="numeric columns as dense values, buckets, or both (default: both with "
        "--numeric-buckets, else dense)",
    )
    p.set_defaults(func=_run(lambda a, o: prepare_table(a.paths, a.out, _schema(a), o)))
    return ["random", "ordered"], 1


def _schema(args: argparse.Namespace) -> TableSchema:
    raw = read_schema_file(args.schema) if args.schema else {}
    flags = {
        "label": args.label,
        "categorical": args.categorical,
        "numeric": args.numeric,
        "multi_valued": dict(args.multi) if args.multi else None,
        "format": args.format,
        "delimiter": args.delimiter,
        "numeric_transform": args.numeric_transform,
        "numeric_buckets": args.numeric_buckets,
        "numeric_as": args.numeric_as,
        "positive": args.positive,
        "negative": args.negative,
    }
    if args.columns is not None:  # naming the columns means the file has no header line
        flags.update(columns=args.columns, header=False)
    raw.update({k: v for k, v in flags.items() if v is not None})
    return TableSchema.from_dict(raw, where=args.schema or "command line")


def _run(prepare: Callable[[argparse.Namespace, PrepareOptions], DatasetMeta]) -> Callable:
    def run(args: argparse.Namespace) -> int:
        try:
            options = PrepareOptions(
                min_count=args.min_count,
                split=args.split,
                fractions=_fractions(args.fractions),
                seed=args.seed,
                on_bad_row=args.on_bad_row,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                block_bytes=args.block_mb << 20,
                rows_per_shard=args.rows_per_shard,
                max_dropped_fraction=args.max_dropped_fraction,
            )
            prepare(args, options)
        except (BadInputError, ValueError, OSError) as e:
            print(f"ctr prepare {args.prepare_format}: error: {e}", file=sys.stderr)
            return 2
        return 0

    return run


def _fractions(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"--fractions needs three comma-separated numbers, got {text!r}")
    return tuple(float(x) for x in parts)


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _multi(text: str) -> tuple[str, str]:
    name, sep, separator = text.partition(":")
    if not sep or not name or not separator:
        raise argparse.ArgumentTypeError(f"expected COL:SEP, e.g. tags:'|', got {text!r}")
    return name, separator


def _day_list(text: str) -> list[int]:
    days: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            days += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected days like 0-22 or 21,22, got {text!r}") from e
    return days
