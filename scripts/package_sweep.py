"""Collects the newest cell of every (method, options, budget, seed) from this session's
sweep directories and the earlier ones into ``cells/`` here, then writes the report.

A cell whose method changed defaults or formats since it ran is left out where a rerun
exists (the sources are read newest first) and, for the methods listed in ``STALE``, left
out of the older directories altogether except for budgets the solver refused (refusals
are decided without training and were re-checked against today's solver)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

SWEEPS = Path("/work/sweepdata")
HERE = Path(__file__).resolve().parent
# Newest first: pep/deeplight refusals under the split pointers, dnis/autodim after the
# bilevel batch fix, pep/deeplight at 2x with today's defaults, optembed at 100x, the 2x
# column, pep with its fill and deeplight with split pointers at 10x, optembed with its
# fill, then the carried-over first sweep.
SOURCES = ["s7ref", "s5", "s5prune", "s5opt", "s4", "s3fill", "s3new", "s3opt", "s3"]
STALE = {
    "s3": {"pep", "deeplight", "dnis", "autodim", "optembed"},
    "s3new": {"pep"},
    "s3opt": set(),
}


def report(folder: Path) -> None:
    command = ["ctr.cli", "sweep", "report", str(folder), "--out", str(folder / "report")]
    subprocess.run(
        [sys.executable, "-m", *command, "--overwrite"], check=True, stdout=subprocess.DEVNULL
    )
    (folder / "report" / "results.parquet").unlink(missing_ok=True)  # the CSV has the rows


def epochs_check() -> None:
    """DNIS at 2x with its stages cut to 2 epochs in all and with α frozen, and full given 6
    epochs: the sweep directory s6 as it is, with its own report."""
    folder = HERE.parent / "epochs-check"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "cells").mkdir(parents=True)
    for result_path in sorted((SWEEPS / "s6" / "cells").glob("*/result.json")):
        dest = folder / "cells" / result_path.parent.name
        dest.mkdir()
        for name in ("cell.json", "result.json"):
            shutil.copy(result_path.with_name(name), dest / name)
    report(folder)


def main() -> None:
    out = HERE / "cells"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    chosen: dict[tuple, Path] = {}
    for source in SOURCES:
        for result_path in sorted((SWEEPS / source / "cells").glob("*/result.json")):
            result = json.loads(result_path.read_text())
            cell = json.loads(result_path.with_name("cell.json").read_text())
            options = json.dumps(cell.get("method_options", {}), sort_keys=True)
            key = (result["method"], options, str(result["budget"]), result["seed"])
            stale = result["method"] in STALE.get(source, set())
            if key in chosen or (stale and result["status"] == "done"):
                continue
            chosen[key] = result_path.parent
    for directory in chosen.values():
        dest = out / directory.name
        dest.mkdir()
        for name in ("cell.json", "result.json"):
            shutil.copy(directory / name, dest / name)
    print(f"{len(chosen)} cells")
    report(HERE)
    epochs_check()


if __name__ == "__main__":
    main()
