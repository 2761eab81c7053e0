"""Moved to :mod:`ctr.cli.sweep`; this name stays for one release."""

from ctr.cli.sweep import add_sweep_parser, cmd_sweep_report, cmd_sweep_run  # noqa: F401
