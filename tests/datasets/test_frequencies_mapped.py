"""Train frequencies are mapped, not loaded: a method that never reads them costs no memory.

At millions of ids the counts are 8 bytes per id, handed to every method; most methods never
read them. The check on loading reads them in chunks, so it leaves nothing resident either.
Residency is this process's RSS of the file's mapping (``/proc/self/smaps``, Linux only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctr.embedding import EmbeddingLayer, features_from_dataset
from datasets.prepared import FREQUENCIES_FILE, DatasetMeta, SparseField, save_frequencies

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps (Linux)"
)
BIG = 1 << 20  # ids of the large field: 8 MiB of counts


def _resident_bytes(path: Path) -> int:
    """RSS of every mapping of ``path`` in this process."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.fixture
def meta(tmp_path: Path) -> DatasetMeta:
    rng = np.random.default_rng(0)
    counts = {
        "big": np.sort(rng.integers(1, 1000, BIG))[::-1].copy(),
        "small": np.array([5, 9, 3, 1]),
    }
    save_frequencies(tmp_path, counts)
    fields = [SparseField("big", BIG), SparseField("small", 4)]
    return DatasetMeta("t", "label", [], fields, {}, root=tmp_path)


def test_loading_and_building_a_method_that_ignores_them_leave_them_unread(meta):
    path = meta.root / FREQUENCIES_FILE
    freqs = meta.frequencies()
    assert _resident_bytes(path) < 64 << 10  # the check read them in chunks, unmapped
    layer = EmbeddingLayer(features_from_dataset(meta), 8, "hash", "100x")
    assert layer.compressor.features[0].frequencies is not None
    assert _resident_bytes(path) < 64 << 10
    # The measurement sees them once read (a method that uses them pays for them).
    assert int(freqs["big"].sum()) > 0
    assert _resident_bytes(path) >= BIG * 8 * 0.9


def test_mapped_counts_equal_the_saved_ones_and_writes_never_reach_the_file(meta):
    path = meta.root / FREQUENCIES_FILE
    before = path.read_bytes()
    freqs = meta.frequencies()
    assert type(freqs["big"]) is np.ndarray and freqs["big"].dtype == np.int64
    np.testing.assert_array_equal(freqs["small"], [5, 9, 3, 1])
    freqs["small"][0] = 7  # copy-on-write: this process only
    assert path.read_bytes() == before
    np.testing.assert_array_equal(meta.frequencies()["small"], [5, 9, 3, 1])
