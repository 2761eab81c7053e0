"""The papers' claims at equal bytes, each over 3 seeds with each side at its own best
learning rate (of :data:`table_checks.LR_SCALES`, picked on seed 0's validation AUC).

A claim is asserted only where it holds beyond the seed noise: the runs of one seed share
the initial weights' seed and the data order, so the comparison is paired, and a win needs
every seed's gain positive and the mean gain above the gains' spread (:func:`beats`).
Measured on ``learn_data`` (a fifth of an epoch, DeepFM, test AUC per seed 0/1/2):

* 5x, every field compressed (``threshold=0``): per-field hash .660/.664/.640; shared hash
  .700/.693/.683 and adapt .726/.726/.713 win (asserted). Unified Embedding .697/.727/.646
  (gains .037/.063/.006) and QR .726/.697/.644 (.066/.033/.004) win on the mean but not
  beyond the seed spread at this length, so their claims are not asserted here (the bench's
  ``unified_claim`` section measures Unified's at full length).
* 20x, small fields kept as tables by both sides (their defaults): hash .537/.583/.593;
  TT-Rec (Gaussian init) .697/.710/.691 and ROBE-Z .705/.717/.721 win (asserted); DHE
  .636/.619/.607 (gains .099/.037/.014, with ``min_hashes=32``: at 20x this tiny data only
  affords 64 hashes) is not asserted; TT with the reference's approx-normal init
  .527/.516/.526 loses to hashing here (see ``compressors/hashing/tt.py``).

How each method learns (and that a broken one fails) is tested in ``test_learning_checks.py``
and ``test_hybrid.py``.
"""

from __future__ import annotations

import pytest

from tests.helpers.table_checks import beats, seed_runs

CLAIMS_5X = {
    "hash": ("hash", {}),
    "hash-shared": ("hash", {"shared": True}),
    "adapt": ("adapt", {}),
}


@pytest.fixture(scope="module")
def learned(learn_data):
    return {
        run: seed_runs(learn_data, name, "5x", threshold=0, **options)
        for run, (name, options) in CLAIMS_5X.items()
    }


def test_equal_bytes(learned):
    sizes = [result["serve_bytes"] for result in learned.values()]
    assert max(sizes) - min(sizes) <= 64
    assert all(r["serve_bytes"] <= r["budget_bytes"] for r in learned.values())


def test_multiplexing_into_one_table_beats_per_field_hashing(learned):
    assert beats(learned["hash-shared"]["aucs"], learned["hash"]["aucs"]), learned


def test_frequent_rows_beat_hashing(learned):
    assert beats(learned["adapt"]["aucs"], learned["hash"]["aucs"]), learned


@pytest.fixture(scope="module")
def learned_20x(learn_data):
    return {name: seed_runs(learn_data, name, "20x") for name in ("hash", "tt", "robe")}


@pytest.mark.parametrize("method", ["tt", "robe"])
def test_table_less_methods_beat_hashing_at_high_compression(learned_20x, method):
    baseline, ours = learned_20x["hash"], learned_20x[method]
    assert abs(ours["serve_bytes"] - baseline["serve_bytes"]) <= 0.1 * baseline["serve_bytes"]
    assert ours["serve_bytes"] <= ours["budget_bytes"]
    assert beats(ours["aucs"], baseline["aucs"]), (method, ours, baseline)
