"""Every table-based hashing and precision method learns, and its learning check can fail.

The check: a short run's test AUC minus the same model's test AUC with the embedding layer's
output zeroed (the dense features alone) must exceed :data:`LEARNING_MARGIN`. An AUC floor
alone would not do: dense features reach ~.53-.59 here by themselves. The mutation check runs
the same check on a method whose output is zeroed while it trains (it learns nothing) and
requires it to fail, so the learning check cannot pass vacuously. (The table-less tt, robe
and dhe are checked on their module's fields in ``test_hybrid.py``.)

Measured margins at 0.1 epoch (``learn_data``): hash .10, unified .18, qr .18, adapt .12,
ptq .11, int8 .12, int16 .11, alpt (2-bit) .13, binary .11; mutated: 0.
"""

from __future__ import annotations

import pytest

from tests.helpers.table_checks import learning_margin

LEARNING_MARGIN = 0.05

METHODS = {
    "hash": ("5x", {}),
    "unified": ("5x", {}),
    "qr": ("5x", {}),
    "adapt": ("5x", {}),
    "ptq": ("5x", {}),
    "int8": ("3x", {}),
    "int16": ("2x", {}),
    "alpt": ("6x", {"bits": 2}),
    "binary": ("10x", {}),
}


@pytest.mark.parametrize("method", METHODS)
def test_learns_beyond_its_ablation(method, learn_data):
    budget, options = METHODS[method]
    learned, ablated = learning_margin(learn_data, method, budget, epochs=0.1, **options)
    assert learned - ablated > LEARNING_MARGIN, (method, learned, ablated)


@pytest.mark.parametrize("method", METHODS)
def test_a_method_that_learns_nothing_fails_the_check(method, learn_data):
    budget, options = METHODS[method]
    learned, ablated = learning_margin(
        learn_data, method, budget, mutate=True, epochs=0.02, **options
    )
    assert not learned - ablated > LEARNING_MARGIN, (method, learned, ablated)
