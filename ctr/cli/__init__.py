"""The ``ctr`` command line (``ctr.cli:main``): the parser and dispatch are in
:mod:`ctr.cli.main`, each command group in its own module."""

from ctr.cli.common import HelpFormatter
from ctr.cli.main import build_parser, main

__all__ = ["HelpFormatter", "build_parser", "main"]
