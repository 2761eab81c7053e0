"""hash, unified, qr and adapt learn the planted signal; the papers' claims at equal bytes.

Every method trains once (a small DeepFM, a fifth of an epoch of ``learn_data``) at the same
5x budget, fields all compressed (``threshold=0``), against per-field hashing of the same
size: Unified Embedding's multiplexing, QR's unique pairs and adapt's frequent rows must
each beat it.
"""

from __future__ import annotations

import pytest
from table_checks import learn

RUNS = {
    "hash": ("hash", {}),
    "hash-shared": ("hash", {"shared": True}),
    "unified": ("unified", {}),
    "qr": ("qr", {}),
    "adapt": ("adapt", {}),
}


@pytest.fixture(scope="module")
def learned(learn_data):
    return {
        run: learn(learn_data, name, "5x", threshold=0, **options)
        for run, (name, options) in RUNS.items()
    }


def test_every_method_learns_within_its_budget(learned):
    for run, result in learned.items():
        assert result["serve_bytes"] <= result["budget_bytes"], run
        assert result["auc"] > 0.62, (run, result)


def test_equal_bytes(learned):
    sizes = [result["serve_bytes"] for result in learned.values()]
    assert max(sizes) - min(sizes) <= 64


def test_multiplexing_beats_per_field_hashing(learned):
    # Unified Embedding's central claim (Coleman et al. 2023): same bytes, better AUC.
    assert learned["unified"]["auc"] > learned["hash"]["auc"] + 0.01
    assert learned["hash-shared"]["auc"] > learned["hash"]["auc"]


def test_unique_pairs_beat_hashing(learned):
    assert learned["qr"]["auc"] > learned["hash"]["auc"]


def test_frequent_rows_beat_hashing(learned):
    assert learned["adapt"]["auc"] > learned["hash"]["auc"] + 0.01
