"""Packages sweep directories into what ``results/`` commits: a report, and optionally one
sweep directory holding the newest cell of each (method, options, budget, seed).

    python -m scripts.package_sweep SWEEP [SWEEP ...] --report DIR [--collect DIR]
                                    [--stale NAME=METHOD,...] [--every-cell] [--overwrite]

Options:
    SWEEP           sweep directories (each holds ``cells/``), newest first.
    --report DIR    where the report goes: ``ctr sweep report`` (summary.md, results.csv,
                    pareto.png) without ``results.parquet`` (the CSV holds the same rows), the
                    figure stored with a 256-colour palette (a third of the bytes, the same
                    picture). An earlier report there is replaced only with ``--overwrite``.
    --collect DIR   first copy ``cell.json`` and ``result.json`` of the chosen cells into
                    ``DIR/cells`` (a sweep directory ``ctr sweep report`` and a rerun of the spec
                    read back); the report is then of DIR alone. Without it, the report is of
                    the SWEEPs together (``ctr sweep report``'s own rule for duplicates).
    --stale NAME=M  in the SWEEP whose folder is named NAME, finished cells of methods M are
                    left out (their defaults or formats changed since they ran); refusals are
                    kept (a refusal is decided without training). Repeatable.
    --every-cell    with ``--collect``: copy every finished cell, duplicates included (a sweep
                    directory copied as it is), instead of the newest of each.
    --overwrite     replace an earlier ``--collect`` output or report.

Example (``results/sweep-synth200k-3`` from its sources, newest first)::

    python -m scripts.package_sweep $S/s7ref $S/s5 $S/s5prune $S/s5opt $S/s4 $S/s3fill \\
        $S/s3new $S/s3opt $S/s3 --stale s3=pep,deeplight,dnis,autodim,optembed \\
        --stale s3new=pep --collect ARCHIVE/sweep-synth200k-3 \\
        --report results/sweep-synth200k-3/report
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

from datasets.io import OutputExistsError, atomic_write_bytes, replace_dir

CELL_FILES = ("cell.json", "result.json")
PALETTE_COLOURS = 256


def _stale(values: list[str]) -> dict[str, set[str]]:
    stale: dict[str, set[str]] = {}
    for value in values:
        name, sep, methods = value.partition("=")
        if not sep or not name or not methods:
            raise SystemExit(f"--stale {value!r}: expected NAME=METHOD[,METHOD...]")
        stale.setdefault(name, set()).update(m for m in methods.split(",") if m)
    return stale


def choose_cells(
    sweeps: list[Path], stale: dict[str, set[str]], every_cell: bool = False
) -> list[Path]:
    """The cell directories to keep: reading the sweeps in order (newest first), the first
    cell of each (method, options, budget, seed), stale finished cells skipped."""
    chosen: dict[tuple, Path] = {}
    kept: list[Path] = []
    for sweep in sweeps:
        results = sorted((sweep / "cells").glob("*/result.json"))
        if not results:
            raise SystemExit(f"{sweep}: no finished cells (cells/*/result.json)")
        for result_path in results:
            result = json.loads(result_path.read_text())
            cell = json.loads(result_path.with_name("cell.json").read_text())
            if result["status"] == "done" and result["method"] in stale.get(sweep.name, set()):
                continue
            if every_cell:
                kept.append(result_path.parent)
                continue
            options = json.dumps(cell.get("method_options", {}), sort_keys=True)
            key = (result["method"], options, str(result["budget"]), result["seed"])
            chosen.setdefault(key, result_path.parent)
    return kept if every_cell else list(chosen.values())


def _is_cells(path: Path) -> bool:
    """Whether ``path`` holds only cell directories of cell.json/result.json (our output)."""
    return all(
        p.is_dir() and all(f.name in CELL_FILES for f in p.iterdir()) for p in path.iterdir()
    )


def collect(cells: list[Path], out: Path, overwrite: bool) -> None:
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise SystemExit(f"{duplicate}: two chosen cells share a name; give one sweep less")
    with replace_dir(out / "cells", "cell collection", _is_cells, overwrite) as staging:
        for cell in cells:
            (staging / cell.name).mkdir()
            for name in CELL_FILES:
                shutil.copy(cell / name, staging / cell.name / name)


def compact_png(path: Path) -> None:
    """Rewrites a Matplotlib PNG with a 256-colour palette (its few flat colours survive)."""
    from PIL import Image

    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(
            colors=PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", optimize=True)
    atomic_write_bytes(path, buffer.getvalue())


def report(sweeps: list[Path], out: Path, overwrite: bool) -> None:
    # The installed CLI beside this interpreter: the public command, wherever its code lives.
    ctr = Path(sys.executable).with_name("ctr")
    command = [str(ctr) if ctr.exists() else "ctr", "sweep", "report", *map(str, sweeps)]
    command += ["--out", str(out)] + (["--overwrite"] if overwrite else [])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    (out / "results.parquet").unlink(missing_ok=True)
    for png in sorted(out.glob("pareto*.png")):
        compact_png(png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.package_sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweeps", type=Path, nargs="+", metavar="SWEEP", help="newest first")
    parser.add_argument("--report", type=Path, required=True, help="the report directory")
    parser.add_argument("--collect", type=Path, help="copy the chosen cells to DIR/cells")
    parser.add_argument("--stale", action="append", default=[], metavar="NAME=METHOD,...")
    parser.add_argument("--every-cell", action="store_true", help="with --collect: all cells")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    stale = _stale(args.stale)
    for sweep in args.sweeps:
        if not (sweep / "cells").is_dir():
            parser.error(f"{sweep}: not a sweep directory (no cells/)")
    if args.every_cell and not args.collect:
        parser.error("--every-cell needs --collect")
    if stale and not args.collect:
        parser.error("--stale needs --collect (a report reads whole sweep directories)")
    sweeps = args.sweeps
    try:
        if args.collect:
            cells = choose_cells(sweeps, stale, args.every_cell)
            collect(cells, args.collect, args.overwrite)
            print(f"{len(cells)} cells -> {args.collect / 'cells'}")
            sweeps = [args.collect]
        report(sweeps, args.report, args.overwrite)
    except OutputExistsError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        return e.returncode  # ctr sweep report said why on stderr
    print(f"report -> {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
