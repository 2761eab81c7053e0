"""Helpers the test files share (import as ``tests.helpers.<module>``), and the repository's
paths: the tests live in subfolders by the code they test, so none computes paths from its
own location."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
