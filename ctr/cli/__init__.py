"""The ``ctr`` command line (``ctr.cli:main``); the parser and dispatch are in
:mod:`ctr.cli.main`."""

from ctr.cli.main import HelpFormatter, build_parser, main

__all__ = ["HelpFormatter", "build_parser", "main"]
