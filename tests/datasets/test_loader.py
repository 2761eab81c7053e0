import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import KeyedJaggedTensor

from datasets.loader import PAD_LABEL, BatchLoader
from datasets.prepared import DatasetMeta, PreparedDataError


def _all(loader, **kw):
    return list(loader.epoch(0, **kw))


def test_unshuffled_batches_reproduce_the_parquet_rows(tiny_data):
    meta = DatasetMeta.load(tiny_data)
    table = pq.read_table(meta.files("train")).to_pandas()
    loader = BatchLoader(meta, "train", batch_size=512)
    batches = _all(loader)
    assert len(batches) == len(loader) == 8  # 4000 rows / 512, last one partial
    labels = torch.cat([b.labels for b in batches]).numpy()
    np.testing.assert_array_equal(labels, table["label"].to_numpy())
    dense = torch.cat([b.dense_features for b in batches]).numpy()
    np.testing.assert_allclose(dense, table[meta.dense].to_numpy(), rtol=0, atol=0)
    for name in ("C1", "C5"):
        got = torch.cat([b.sparse_features[name].values() for b in batches]).numpy()
        np.testing.assert_array_equal(got, table[name].to_numpy())
    bags = [list(x) for x in table["M1"]]
    got_bags = []
    for b in batches:
        jt = b.sparse_features["M1"]
        got_bags += [t.tolist() for t in jt.to_dense()]
    assert got_bags == bags


def test_batch_is_a_torchrec_batch_with_kjt(tiny_data):
    batch = next(iter(BatchLoader(tiny_data, "valid", batch_size=64)))
    kjt = batch.sparse_features
    assert isinstance(kjt, KeyedJaggedTensor)
    assert kjt.keys() == [f"C{i}" for i in range(1, 8)] + ["M1"]
    assert kjt.stride() == 64 and batch.labels.shape == (64,)
    assert batch.dense_features.dtype == torch.float32 and kjt.values().dtype == torch.int64


def test_shuffle_is_seeded_and_covers_every_row_once(tiny_data):
    a = BatchLoader(tiny_data, "train", batch_size=1000, shuffle=True, seed=1)
    b = BatchLoader(tiny_data, "train", batch_size=1000, shuffle=True, seed=1)
    la = torch.cat([x.dense_features[:, 0] for x in a.epoch(0)])
    lb = torch.cat([x.dense_features[:, 0] for x in b.epoch(0)])
    assert torch.equal(la, lb)
    lc = torch.cat([x.dense_features[:, 0] for x in a.epoch(1)])
    assert not torch.equal(la, lc)
    plain = torch.cat([x.dense_features[:, 0] for x in BatchLoader(tiny_data, "train").epoch(0)])
    assert torch.equal(la.sort().values, plain.sort().values)


def test_row_shares_split_the_split_in_disjoint_covering_parts(tiny_data):
    meta = DatasetMeta.load(tiny_data)
    column = meta.dense[0]
    whole = BatchLoader(tiny_data, "train", batch_size=300)
    head, tail = whole.share(0.0, 0.8), whole.share(0.8, 1.0)
    assert head.rows + tail.rows == whole.rows and 0 < tail.rows < head.rows

    def rows(loader):
        return torch.cat([b.dense_features[:, 0] for b in loader.epoch(0)])

    # Unshuffled, each share is its slice of every shard, in shard order.
    shards = [pq.read_table(f, columns=[column])[column].to_numpy() for f in meta.files("train")]
    for part, (low, high) in ((head, (0.0, 0.8)), (tail, (0.8, 1.0))):
        want = np.concatenate([x[int(len(x) * low) : int(len(x) * high)] for x in shards])
        assert torch.equal(rows(part), torch.from_numpy(want.astype(np.float32)))
        assert len(part) == -(-part.rows // 300)
    shuffled = whole.resized(300, shuffle=True, drop_last=False)
    again = torch.cat([rows(shuffled.share(0.0, 0.8)), rows(shuffled.share(0.8, 1.0))])
    assert torch.equal(again.sort().values, rows(whole).sort().values)
    assert torch.equal(rows(shuffled.share(0.0, 1.0)), rows(shuffled))  # the same shuffle
    with pytest.raises(ValueError, match="row share"):
        whole.share(0.5, 0.5)


def test_a_batch_spanning_shards_holds_only_its_rows_of_them(tiny_data, monkeypatch):
    """A small share takes a few rows of every shard: a batch must not keep every decoded
    shard it drew from alive (their number grows with the split), only the rows it takes."""
    import weakref

    decoded: list[weakref.ref] = []
    decode = BatchLoader._decode

    def tracked(self, table, path):
        cols = decode(self, table, path)
        decoded.append(weakref.ref(cols))
        return cols

    monkeypatch.setattr(BatchLoader, "_decode", tracked)
    whole = BatchLoader(tiny_data, "train", batch_size=1000, cache_rows=0)
    part = whole.share(0.0, 0.1)  # ~100 rows of each shard: one batch spans every shard
    assert len(whole.files) >= 3 and len(part) == 1
    batches = []
    for batch in part.epoch(0):
        assert sum(ref() is not None for ref in decoded) <= 1, "decoded shards held by a batch"
        batches.append(batch)
    assert len(decoded) == len(whole.files)
    # The same rows as gathering from the whole shards (multi-hot bags included).
    meta = DatasetMeta.load(tiny_data)
    table = pq.read_table(meta.files("train")).to_pandas()
    per_shard = [pq.read_metadata(f).num_rows for f in meta.files("train")]
    starts = np.cumsum([0, *per_shard[:-1]])
    want = np.concatenate(
        [s + np.arange(int(n * 0.1)) for s, n in zip(starts, per_shard, strict=True)]
    )
    got = batches[0]
    np.testing.assert_array_equal(got.labels.numpy(), table["label"].to_numpy()[want])
    np.testing.assert_array_equal(
        got.sparse_features["C1"].values().numpy(), table["C1"].to_numpy()[want]
    )
    bags = [list(table["M1"][i]) for i in want]
    assert [t.tolist() for t in got.sparse_features["M1"].to_dense()] == bags


def test_start_batch_skips_exactly(tiny_data):
    loader = BatchLoader(tiny_data, "train", batch_size=700, shuffle=True, seed=5)
    full = _all(loader)
    rest = _all(loader, start_batch=3)
    assert len(rest) == len(full) - 3
    for x, y in zip(full[3:], rest, strict=True):
        assert torch.equal(x.labels, y.labels) and torch.equal(
            x.sparse_features.values(), y.sparse_features.values()
        )


def test_ranks_split_each_global_batch_and_pad_the_last(tmp_path):
    from datasets.synthetic import SyntheticConfig, generate_synthetic

    generate_synthetic(
        tmp_path, SyntheticConfig(rows=1_001, cardinalities=(20, 30), num_dense=1), progress=False
    )  # 801 train rows: the last batch of 256 has 33
    whole = _all(BatchLoader(tmp_path, "train", batch_size=256))
    ranks = [
        _all(BatchLoader(tmp_path, "train", batch_size=256, rank=r, world_size=2)) for r in (0, 1)
    ]
    for g, r0, r1 in zip(whole, *ranks, strict=True):
        assert len(r0.labels) == len(r1.labels)
        joined = torch.cat([r0.labels, r1.labels])
        real = joined[joined != PAD_LABEL]
        assert torch.equal(real, g.labels)
        assert torch.equal(
            r0.sparse_features["C2"].values(), g.sparse_features["C2"].values()[: len(r0.labels)]
        )
    assert (ranks[1][-1].labels == PAD_LABEL).sum() == 1


def test_drop_last_and_bad_batch_size(tiny_data):
    loader = BatchLoader(tiny_data, "train", batch_size=512, drop_last=True)
    assert len(loader) == 7 and all(len(b.labels) == 512 for b in loader.epoch(0))
    with pytest.raises(ValueError, match="positive"):
        BatchLoader(tiny_data, "train", batch_size=0)
    with pytest.raises(ValueError, match="divisible"):
        BatchLoader(tiny_data, "train", batch_size=5, world_size=2)


def test_missing_dataset_and_split_errors(tiny_data, tmp_path):
    with pytest.raises(PreparedDataError, match="no meta.json"):
        BatchLoader(tmp_path, "train")
    with pytest.raises(PreparedDataError, match="no split 'dev'"):
        BatchLoader(tiny_data, "dev")


def test_out_of_range_ids_are_reported_with_the_file(tiny_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    meta = DatasetMeta.load(copy)
    path = meta.files("valid")[0]
    table = pq.read_table(path).to_pandas()
    table.loc[3, "C2"] = 10_000
    import pyarrow as pa

    pq.write_table(
        pa.Table.from_pandas(table, preserve_index=False).cast(pq.read_schema(path)), path
    )
    with pytest.raises(PreparedDataError, match=r"part-00000.parquet: field 'C2' has id 10000"):
        _all(BatchLoader(copy, "valid"))


def test_prefetching_yields_the_same_batches_and_stops_cleanly(tiny_data):
    import threading

    plain = BatchLoader(tiny_data, "train", batch_size=512, shuffle=True, seed=3)
    ahead = BatchLoader(tiny_data, "train", batch_size=512, shuffle=True, seed=3, prefetch=2)
    for epoch, start in ((0, 0), (1, 2)):
        mine, theirs = list(ahead.epoch(epoch, start)), list(plain.epoch(epoch, start))
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a.labels, b.labels)
            assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
            assert torch.equal(a.dense_features, b.dense_features)
    for _ in ahead.epoch(0):  # leaving early stops the producer thread
        break
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())


def test_prefetching_reraises_the_producers_error():
    from datasets.prefetch import prefetched

    def broken():
        yield 1
        raise PreparedDataError("bad shard")

    got = []
    with pytest.raises(PreparedDataError, match="bad shard"):
        for item in prefetched(broken(), 2):
            got.append(item)
    assert got == [1]
