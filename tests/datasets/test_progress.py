"""Progress in a log is a few lines, never ``\\r`` redraws; a quiet run still says each stage."""

from __future__ import annotations

import io
import re
from pathlib import Path

from ctr.cli import main
from datasets.progress import LogProgress, progress_bar


def test_a_bar_into_a_log_writes_milestone_lines_only():
    log = io.StringIO()
    bar = progress_bar(1000, "train", unit="steps", show=True, stream=log)
    assert isinstance(bar, LogProgress)
    LogProgress.MIN_SECONDS = 60.0
    with bar:
        for _ in range(1000):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "train: 0/1,000 steps" and lines[-1].startswith(
        "train: 1,000/1,000 steps in"
    )
    assert len(lines) <= 12


def test_quiet_modes():
    for quiet, expected in (("none", 0), ("ends", 2), ("each", 5)):
        log = io.StringIO()
        with progress_bar(3, "search", show=False, quiet=quiet, stream=log) as bar:
            for _ in range(3):
                bar.update(1)
        assert len(log.getvalue().splitlines()) == expected, quiet


def test_piped_training_log_has_no_carriage_returns_and_quiet_runs_name_stages(
    tiny_data: Path, tmp_path, capsys
):
    argv = ["train", "--data", str(tiny_data), "--dim", "4", "--batch-size", "64"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "train: 0/" in err
    assert re.search(r"^train: \d+/\d+ steps.* in \d+s$", err, re.M)
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train: ")]
    assert len(lines) == 2 and lines[1].endswith("s") and " in " in lines[1]
