"""The tree stays ruff-clean (the project's lint configuration lives in pyproject.toml)."""

import subprocess
import sys

from tests.helpers import ROOT


def test_ruff_check_passes():
    root = ROOT
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:]
