"""Fusing tables (and anything else using ``spilled``) never holds the old and new whole."""

from __future__ import annotations

import torch

from compressors.core import storage
from compressors.core.spill import spilled
from compressors.core.storage import Lookup, TableSpec, TrainTables


def test_spilled_frees_the_tensors_and_hands_them_back_equal_from_a_removed_file(
    tmp_path, monkeypatch
):
    from compressors.core import spill

    folder = tmp_path / "spill"
    monkeypatch.setattr(spill.tempfile, "mkdtemp", lambda prefix: str(folder.mkdir() or folder))
    tensors = {"a": torch.randn(1000, 8), "b": torch.arange(500.0)}
    want = {k: v.clone() for k, v in tensors.items()}
    with spilled(tensors) as mapped:
        assert all(t.untyped_storage().nbytes() == 0 for t in tensors.values())  # freed
        assert (folder / "weights.pt").exists()
        got = {k: v.clone() for k, v in mapped()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not folder.exists()


def test_fusing_frees_the_old_tables_before_the_fused_ones_are_allocated(monkeypatch):
    tables = [TableSpec("t0", rows=3000, dim=8), TableSpec("t1", rows=500, dim=8)]
    train = TrainTables(tables, [Lookup("C1", "t0"), Lookup("C2", "t1")])
    old = train.weights()
    before = {k: v.detach().clone() for k, v in old.items()}
    real = storage.FusedEmbeddingBagCollection
    held = []

    class Tracked(real):
        def __init__(self, *args, **kwargs):
            held.append(sum(w.untyped_storage().nbytes() for w in old.values()))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(storage, "FusedEmbeddingBagCollection", Tracked)
    train.fuse("rowwise_adagrad", 0.1)
    assert held == [0], "the old tables were still in memory when the fused ones were made"
    after = train.weights()
    assert isinstance(train.ebc, real)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the same weights


def test_fusing_copies_a_big_table_from_the_file_a_chunk_of_rows_at_a_time(monkeypatch):
    """One table held as one tensor is copied in chunks, the file's pages dropped after
    each (red when it is copied whole: one release per table)."""
    from compressors.core import spill

    tables = [TableSpec("t0", rows=3000, dim=8), TableSpec("t1", rows=50, dim=8)]
    train = TrainTables(tables, [Lookup("C1", "t0"), Lookup("C2", "t1")])
    before = {k: v.detach().clone() for k, v in train.weights().items()}
    released = []
    real_release = spill.release_mapped

    def counted(ranges):
        released.append(len(ranges))
        real_release(ranges)

    monkeypatch.setattr(spill, "CHUNK_BYTES", 100 * 8 * 4)  # 100 rows
    monkeypatch.setattr(spill, "release_mapped", counted)
    train.fuse("rowwise_adagrad", 0.1)
    if spill.sys.platform.startswith("linux"):
        assert len(released) >= 3000 // 100 and all(released)
    after = train.weights()
    assert all(torch.equal(after[k], before[k]) for k in before)
