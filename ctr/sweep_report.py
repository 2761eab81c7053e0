"""Moved to :mod:`ctr.sweep.report` (and :mod:`ctr.sweep.stats`, :mod:`ctr.sweep.plot`); this
name stays for one release."""

from ctr.sweep.plot import pareto_plot  # noqa: F401
from ctr.sweep.report import (  # noqa: F401
    COLUMNS,
    against_full,
    is_report,
    learns_on_validation,
    load_results,
    markdown_summary,
    result_rows,
    variant,
    write_report,
)
from ctr.sweep.stats import best_per_budget, compare, pareto_front  # noqa: F401
