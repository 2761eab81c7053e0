"""The inter-feature methods learn the planted signal; the papers' claims at equal bytes.

Every method trains once (a small DeepFM, a fifth of an epoch of ``learn_data``) against
per-field hashing of the same size. At 5x with every field compressed (``threshold=0``),
Unified Embedding's multiplexing, QR's unique pairs and adapt's frequent rows must each beat
it (single-seed margins: unified +.066, adapt +.061, qr +.041 at table lr 0.05). At 20x,
with small fields kept as tables, TT-Rec, ROBE-Z and DHE must learn at hashing's size; the
papers' "beats hashing" claim is measured under the fair protocol by bench.py's
``table_less_claim`` section.
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


@pytest.fixture(scope="module")
def learned_20x(learn_data):
    return {name: learn(learn_data, name, "20x") for name in ("hash", "tt", "robe", "dhe")}


@pytest.mark.parametrize("method", ["tt", "robe", "dhe"])
def test_table_less_methods_learn_at_high_compression(learned_20x, method):
    # Equal bytes with hashing, within budget, and clearly learning. Whether they *beat*
    # hashing is a claim for the fair protocol (3 seeds, each at its best lr): bench.py
    # --only table_less_claim. (At table lr 0.05, one seed: hash .637, tt .697, robe .697,
    # dhe .619 — the old margin test passed only with hashing's tables at lr 0.2.)
    baseline, ours = learned_20x["hash"], learned_20x[method]
    assert abs(ours["serve_bytes"] - baseline["serve_bytes"]) <= 0.1 * baseline["serve_bytes"]
    assert ours["serve_bytes"] <= ours["budget_bytes"]
    assert ours["auc"] > 0.60, (method, ours["auc"])
