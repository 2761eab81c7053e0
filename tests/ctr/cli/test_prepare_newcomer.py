"""What a new user's first ``ctr prepare table`` meets: a BOM, text labels, a high min count."""

from __future__ import annotations

from pathlib import Path

from ctr.cli import main
from datasets.prepared import DatasetMeta


def _write(path: Path, labels: list[str], bom: bool = False, header: bool = True) -> Path:
    lines = ["clicked,site,price"] if header else []
    lines += [f"{labels[i % len(labels)]},s{i % 7},{i % 11}" for i in range(300)]
    text = "\n".join(lines) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def _prepare(csv: Path, out: Path, *extra: str) -> int:
    flags = ["--label", "clicked", "--categorical", "site", "--numeric", "price"]
    return main(["prepare", "table", str(csv), "--out", str(out), *flags, "--no-progress", *extra])


def test_a_utf8_bom_before_the_header_is_not_part_of_the_first_name(tmp_path):
    csv = _write(tmp_path / "bom.csv", ["0", "1"], bom=True)
    assert _prepare(csv, tmp_path / "out") == 0
    assert DatasetMeta.load(tmp_path / "out").rows("train") > 0
    headless = _write(tmp_path / "headless.csv", ["0", "1"], bom=True, header=False)
    columns = ["--columns", "clicked,site,price"]
    assert _prepare(headless, tmp_path / "out2", *columns, "--max-dropped-fraction", "0") == 0


def test_text_labels_without_a_mapping_say_which_flags(tmp_path, capsys):
    csv = _write(tmp_path / "text.csv", ["yes", "no"])
    assert _prepare(csv, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no usable train rows" in err and "bad_label" in err
    assert "--positive VALUE and --negative VALUE" in err
    assert _prepare(csv, tmp_path / "out", "--positive", "yes", "--negative", "no") == 0


def test_a_min_count_that_empties_a_field_warns(tmp_path, capsys):
    csv = _write(tmp_path / "a.csv", ["0", "1"])
    assert _prepare(csv, tmp_path / "out", "--min-count", "100000") == 0
    err = capsys.readouterr().err
    assert "warning: --min-count 100000 maps every value of 1 of 1 fields (site) to OOV" in err
    assert _prepare(csv, tmp_path / "out2", "--min-count", "2") == 0
    assert "warning" not in capsys.readouterr().err
