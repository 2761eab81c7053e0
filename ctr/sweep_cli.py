"""Moved to :mod:`ctr.cli.sweep`; this name stays for one release."""

from ctr.cli.sweep import add_parsers as add_sweep_parser  # noqa: F401
from ctr.cli.sweep import cmd_sweep_report, cmd_sweep_run, spec_from_args  # noqa: F401
