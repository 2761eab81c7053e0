"""Moved to :mod:`ctr.sweep.report`; this name stays for one release."""

from ctr.sweep.report import (  # noqa: F401
    COLUMNS,
    against_full,
    best_per_budget,
    compare,
    is_report,
    learns_on_validation,
    markdown_summary,
    pareto_front,
    pareto_plot,
    result_rows,
    variant,
    write_report,
)
