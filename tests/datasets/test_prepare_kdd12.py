"""``prepare kdd12`` on a 20-line training.txt fixture (line 7 has 3 clicks of 2 impressions)."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.prepare.splits import random_split
from datasets.prepared import SPLITS
from datasets.readers.kdd12 import KDD12_FEATURES, Kdd12Config, prepare_kdd12
from tests.helpers.prepare_support import FIXTURES, decode, options, read_all_splits, read_split

TRAINING_TXT = FIXTURES / "kdd12" / "training.txt"
ALL_TRAIN = {"min_count": 1, "split": "ordered", "fractions": (1.0, 0.0, 0.0)}


def _good_lines() -> list[list[str]]:
    lines = [line.split("\t") for line in TRAINING_TXT.read_text().splitlines()]
    return [f for n, f in enumerate(lines, 1) if n != 7]


def test_expanded_label_is_one_row_per_impression(tmp_path):
    meta = prepare_kdd12([TRAINING_TXT], tmp_path, options=options(**ALL_TRAIN))
    good = _good_lines()
    table = read_all_splits(tmp_path)
    assert table.num_rows == sum(int(f[1]) for f in good)
    assert table["label"].to_pylist() == [
        float(k < int(f[0])) for f in good for k in range(int(f[1]))
    ]
    ads = [f[KDD12_FEATURES.index("ad_id") + 2] for f in good for _ in range(int(f[1]))]
    assert decode(tmp_path, "ad_id", table["ad_id"].to_pylist()) == ads
    assert meta.bad_rows == {
        "bad_label": {"count": 1, "examples": [f"{TRAINING_TXT}:7"], "fields": {"impression": 1}}
    }
    assert meta.options["config"] == {"label": "expanded"}


def test_binary_label_is_one_row_per_line(tmp_path):
    prepare_kdd12([TRAINING_TXT], tmp_path, Kdd12Config(label="binary"), options(**ALL_TRAIN))
    good = _good_lines()
    table = read_all_splits(tmp_path)
    assert table["label"].to_pylist() == [float(int(f[0]) > 0) for f in good]
    assert table.num_rows == 19


def test_expanded_copies_of_a_line_stay_in_its_split(tmp_path):
    fractions = (0.5, 0.25, 0.25)
    prepare_kdd12(
        [TRAINING_TXT],
        tmp_path,
        options=options(min_count=1, split="random", fractions=fractions, seed=3),
    )
    codes = random_split(3, fractions).assign(0, np.arange(20))  # by line position
    lines = [line.split("\t") for line in TRAINING_TXT.read_text().splitlines()]
    for code, split in enumerate(SPLITS):
        expected = [
            float(k < int(f[0]))
            for n, f in enumerate(lines, 1)
            if n != 7 and codes[n - 1] == code
            for k in range(int(f[1]))
        ]
        assert read_split(tmp_path, split)["label"].to_pylist() == expected, split
    assert len(set(codes.tolist())) == 3  # the seed spreads lines over all three splits


def test_bad_label_mode_is_rejected():
    with pytest.raises(ValueError, match="kdd12 label must be one of"):
        Kdd12Config(label="ratio")
