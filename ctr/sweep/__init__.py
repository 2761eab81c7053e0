"""Fair memory–accuracy sweeps (``ctr sweep``): the records (:mod:`ctr.sweep.spec`), the
runner (:mod:`ctr.sweep.runner`) and the report (:mod:`ctr.sweep.report`)."""

from ctr.sweep.report import load_results, write_report
from ctr.sweep.runner import (
    changed_defaults,
    code_version,
    feasibility,
    method_defaults,
    run_cell,
    run_cells,
    run_sweep,
)
from ctr.sweep.spec import (
    CELL_FILE,
    REFERENCE,
    RESULT_FILE,
    SPEC_FILE,
    Cell,
    CellResult,
    ProtocolConfig,
    SweepSpec,
    cell_dir,
    cell_key,
    effective_key,
    effective_protocol,
)

__all__ = [
    "CELL_FILE",
    "REFERENCE",
    "RESULT_FILE",
    "SPEC_FILE",
    "Cell",
    "CellResult",
    "ProtocolConfig",
    "SweepSpec",
    "cell_dir",
    "cell_key",
    "changed_defaults",
    "code_version",
    "effective_key",
    "effective_protocol",
    "feasibility",
    "load_results",
    "method_defaults",
    "run_cell",
    "run_cells",
    "run_sweep",
    "write_report",
]
