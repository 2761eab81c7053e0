"""``RawEncoder``'s memo of recent raw values answers exactly as its vectorised transform.

Every format that declares its features' raw columns is checked on records mixing vocabulary
values, unseen values, missing ones (null, "", absent), numbers of several types and
multi-valued lists, batch after batch (the memo fills as it goes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasets.encode import RawEncoder
from datasets.readers.avazu import prepare_avazu
from datasets.readers.criteo import CriteoConfig, prepare_criteo
from datasets.readers.kdd12 import Kdd12Config, prepare_kdd12
from datasets.readers.movielens import prepare_movielens
from datasets.readers.table import TableSchema, prepare_table
from datasets.synthetic import SyntheticConfig, generate_synthetic
from tests.helpers.prepare_support import FIXTURES, options

# Raw values a field may take beside its own vocabulary's.
EXTRA = {
    "hour": ["14102100", 14102113, "14102223", None],
    "title": ["Toy Story (1995)", "Heat (1995)", "no year", None],
}
NUMBERS = [3, 0, 2.5, -0.0, 0.0, 1e20, -7, True, None, "12", ""]


def _prepared(kind: str, out):
    if kind == "criteo":
        prepare_criteo(
            [FIXTURES / "criteo" / "train.txt"],
            out,
            CriteoConfig(bucketize_dense=True),
            options=options(min_count=2),
        )
    elif kind == "avazu":
        prepare_avazu([FIXTURES / "avazu" / "train.csv"], out, options(min_count=1))
    elif kind == "movielens":
        prepare_movielens(FIXTURES / "ml-100k", out, options=options(min_count=1))
    elif kind == "kdd12":
        prepare_kdd12(
            [FIXTURES / "kdd12" / "training.txt"],
            out,
            Kdd12Config("binary"),
            options(min_count=1, split="ordered", fractions=(1.0, 0.0, 0.0)),
        )
    elif kind == "table":
        schema = json.loads((FIXTURES / "table" / "schema.json").read_text())
        schema["numeric_buckets"] = 4
        schema["numeric_as"] = "both"
        prepare_table(
            [FIXTURES / "table" / "logs.csv"],
            out,
            TableSchema.from_dict(schema),
            options(min_count=1),
        )
    else:
        generate_synthetic(
            out,
            SyntheticConfig(
                rows=600, cardinalities=(30, 50), num_dense=2, multi_hot_fields=1, chunk_rows=256
            ),
            progress=False,
        )
    return RawEncoder.load(out)


def _candidates(encoder: RawEncoder) -> dict[str, list]:
    sparse = {f.name: f for f in encoder.meta.sparse}
    out = {}
    for c in encoder.fields:
        if c in EXTRA:
            out[c] = EXTRA[c]
        elif c in encoder.meta.dense or c in encoder.format.config.__dict__.get("numeric", ()):
            out[c] = NUMBERS
        else:
            vocab = encoder.vocabs[c].values.to_pylist()[:20] if c in sparse else []
            values = [*vocab, "never-seen", None, ""]
            if c in encoder.format.multi_valued:
                sep = encoder.format.multi_valued[c]
                values += [vocab[:2], [], [vocab[0], "never-seen"], sep.join(vocab[:3])]
            out[c] = values
    return out


def _records(candidates: dict[str, list], n: int, rng: np.random.Generator) -> list[dict]:
    records = []
    for _ in range(n):
        record = {}
        for c, values in candidates.items():
            if rng.random() < 0.85:  # else absent
                record[c] = values[int(rng.integers(len(values)))]
        records.append(record)
    return records


def _assert_same(got, want) -> None:
    # Bit patterns, so -0.0 and 0.0 count as different.
    np.testing.assert_array_equal(got.dense.view(np.int32), want.dense.view(np.int32))
    assert got.dense.dtype == want.dense.dtype == np.float32
    assert list(got.sparse) == list(want.sparse)
    for name, ids in want.sparse.items():
        if isinstance(ids, list):
            assert [list(x) for x in got.sparse[name]] == [list(x) for x in ids], name
            np.testing.assert_array_equal(got.lengths[name], want.lengths[name])
        else:
            assert got.sparse[name].dtype == np.int64
            np.testing.assert_array_equal(got.sparse[name], ids, err_msg=name)


@pytest.mark.parametrize("kind", ["criteo", "avazu", "movielens", "kdd12", "table", "synthetic"])
def test_memoised_encoding_equals_the_vectorised_one(kind, tmp_path):
    encoder = _prepared(kind, tmp_path)
    assert encoder._plan is not None, "the format declares its features' raw columns"
    candidates = _candidates(encoder)
    rng = np.random.default_rng(0)
    for n in (1, 1, 3, 17, 17, 64, encoder.MEMO_ROWS + 5):
        records = _records(candidates, n, rng)
        columns = {c: [r.get(c) for r in records] for c in encoder.fields}
        want = encoder._encode_vectorised(columns, n)
        for _ in range(2):  # the second pass answers from a warm memo
            _assert_same(encoder.encode(records), want)
            _assert_same(encoder.encode_columns(columns), want)
    _assert_same(encoder.encode([{}]), encoder._encode_vectorised({}, 1))


def test_a_warm_memo_answers_without_the_vectorised_transform(tmp_path, monkeypatch):
    encoder = _prepared("criteo", tmp_path)
    records = _records(_candidates(encoder), 8, np.random.default_rng(1))
    want = encoder.encode(records)

    def refuse(*args, **kwargs):
        raise AssertionError("the vectorised transform ran for memoised values")

    monkeypatch.setattr(encoder, "_encode_vectorised", refuse)
    _assert_same(encoder.encode(records), want)
    part = want.sparse
    got = encoder.encode(records[3:5])
    np.testing.assert_array_equal(got.dense, want.dense[3:5])
    for name, ids in part.items():
        np.testing.assert_array_equal(got.sparse[name], ids[3:5])


@pytest.mark.parametrize("kind", ["criteo", "avazu", "table", "synthetic"])
def test_new_values_transform_only_their_own_columns(kind, tmp_path, monkeypatch):
    encoder = _prepared(kind, tmp_path)
    candidates = _candidates(encoder)
    records = _records(candidates, 8, np.random.default_rng(3))
    encoder.encode(records)  # warm: every column's values of these rows are memoised
    column = next(
        c for c in encoder.fields if c not in encoder.format.multi_valued and c not in EXTRA
    )
    fresh = [
        dict(r, **{column: 123.25 if column in encoder.meta.dense else "never-seen-2"})
        for r in records[:2]
    ]
    transformed: list[list[str]] = []
    real = encoder.format.transform_columns

    def spy(raw, issues):
        transformed.append(raw.column_names)
        return real(raw, issues)

    def refuse(*args, **kwargs):
        raise AssertionError("a whole table was transformed for one column's new value")

    columns = {c: [r.get(c) for r in fresh] for c in encoder.fields}
    want = encoder._encode_vectorised(columns, 2)
    monkeypatch.setattr(encoder.format, "transform_columns", spy)
    monkeypatch.setattr(encoder, "_encode_vectorised", refuse)
    _assert_same(encoder.encode(fresh), want)
    assert transformed == [[column]]


def test_bad_values_are_refused_alike_with_a_warm_memo(tmp_path):
    encoder = _prepared("criteo", tmp_path)
    encoder.encode([{"I3": "1", "C1": "x"}, {"I3": 2}])  # warm
    with pytest.raises(ValueError, match=r"record 1: bad_number in field 'I3' \(value 'abc'\)"):
        encoder.encode([{"I3": "1"}, {"I3": "abc"}])
    with pytest.raises(ValueError, match="'C1'"):
        encoder.encode([{"C1": {"a": 1}}])
    # NaN never equals itself, so it is never memoised; it encodes as the vectorised path does.
    _assert_same(
        encoder.encode([{"I1": float("nan")}]),
        encoder._encode_vectorised({"I1": [float("nan")]}, 1),
    )
    # A full memo starts over rather than growing.
    encoder.MEMO_VALUES = 4 * len(encoder.fields)  # 4 a column
    for i in range(10):
        encoder.encode([{"C2": f"v{i}"}])
    assert 0 < len(encoder._memo["C2"]) <= 4


def test_a_format_without_declared_sources_is_not_memoised(tmp_path, monkeypatch):
    from datasets.readers.criteo import CriteoFormat

    monkeypatch.setattr(CriteoFormat, "sources", property(lambda self: None))
    encoder = _prepared("criteo", tmp_path)
    assert encoder._plan is None
    assert encoder.encode([{}]).dense.shape == (1, 13)


def test_large_batches_of_new_values_skip_the_memo_until_values_repeat(tmp_path):
    encoder = _prepared("synthetic", tmp_path)
    memoised = []
    real = encoder._encode_memoised
    monkey = lambda *a: memoised.append(1) or real(*a)  # noqa: E731
    encoder._encode_memoised = monkey
    n = encoder.MEMO_ROWS + 1

    def batch(tag: str) -> dict:
        def column(c: str) -> list:
            if c in encoder.meta.dense:
                return [float(f"{len(tag)}{k}.{tag}") for k in range(n)]
            if c in encoder.format.multi_valued:
                return [[f"{tag}-{k}"] for k in range(n)]
            return [f"{tag}-{k}" for k in range(n)]

        return {c: column(c) for c in encoder.fields}

    for i in range(7):  # every value new: after one such batch the memo is skipped
        encoder.encode_columns(batch(str(i)))
    assert len(memoised) == 1
    repeated = batch("0")  # memoised by the first batch
    for _ in range(24):  # every 8th large batch measures again, and finds the values known
        _assert_same(encoder.encode_columns(repeated), encoder._encode_vectorised(repeated, n))
    assert encoder._new_share < 0.25
    before = len(memoised)
    encoder.encode_columns(repeated)
    assert len(memoised) == before + 1  # the memo again


def test_predict_records_rows_and_columns_equal_the_vectorised_answers(tiny_data, tmp_path):
    import torch

    from ctr import CompactModel, EmbeddingLayer, build_model, export, features_from_dataset

    torch.manual_seed(0)
    layer = EmbeddingLayer(features_from_dataset(tiny_data), 8, "full", "1x", init_scale=0.1)
    export(build_model("deepfm", layer, 3, hidden=[16]).eval(), tmp_path / "a", dataset=tiny_data)
    model = CompactModel.load(tmp_path / "a")
    encoder = model.raw_encoder
    rng = np.random.default_rng(3)
    candidates = _candidates(encoder)
    for n in (1, 8, 8, 300):
        records = _records(candidates, n, rng)
        columns = {c: [r.get(c) for r in records] for c in encoder.fields}
        batch = encoder._encode_vectorised(columns, n).to_batch()
        with torch.no_grad():
            want = torch.sigmoid(model(batch.dense_features, batch.sparse_features)).numpy()
        np.testing.assert_array_equal(model.predict_records(records), want)
        np.testing.assert_array_equal(model.predict_columns(columns), want)


@pytest.mark.parametrize("kind", ["criteo", "movielens", "synthetic"])
def test_one_search_over_all_fields_equals_the_field_by_field_lookup(kind, tmp_path):
    import pyarrow as pa

    encoder = _prepared(kind, tmp_path)
    rng = np.random.default_rng(4)
    tokens = {}
    for f in encoder.meta.sparse:
        pool = [*encoder.vocabs[f.name].values.to_pylist(), "never-seen", None, ""]
        tokens[f.name] = pa.array([pool[i] for i in rng.integers(len(pool), size=60)], pa.string())
    got = encoder._all_ids(tokens)
    assert set(encoder._combined[2]) == set(tokens)  # every field in the one index
    for name, t in tokens.items():
        np.testing.assert_array_equal(got[name], encoder._ids(name, t), err_msg=name)
        assert got[name].any()
    # Without the combined index (a collision across fields), each field is searched alone.
    encoder._combined = (np.zeros(0, np.uint64), np.zeros(0, np.int64), {})
    for name, ids in encoder._all_ids(tokens).items():
        np.testing.assert_array_equal(ids, got[name])


def test_columns_of_one_type_are_their_own_keys_and_answer_alike(tmp_path):
    """Columns of only strings or only floats are their own memo keys (zeros, -0.0 and NaN
    among floats are keyed apart or not memoised), answering as the vectorised path."""
    import math

    encoder = _prepared("criteo", tmp_path)
    known = encoder.vocabs["C1"].values.to_pylist()
    vocab = [known[i % len(known)] for i in range(5)]
    batches = [
        {"I1": [2.5, 1e20, 3.0], "C1": [vocab[0], "never-seen", vocab[1]]},
        {"I1": [0.0, -0.0, 2.5], "C1": [vocab[1], vocab[1], ""]},
        {"I1": [-0.0, 0.0, 3.0], "C1": [vocab[2], vocab[0], "never-seen"]},
        {"I1": [math.nan, 2.5, 0.0], "C1": [vocab[3], vocab[4], vocab[0]]},
        {"I1": [3, 3.0, True], "C1": [vocab[0], vocab[0], vocab[0]]},
    ]
    for _ in range(2):
        for columns in batches:
            _assert_same(encoder.encode_columns(columns), encoder._encode_vectorised(columns, 3))
    assert not any(k != k for k in encoder._memo["I1"])  # NaN was never memoised
    assert 2.5 in encoder._memo["I1"] and vocab[0] in encoder._memo["C1"]  # their own keys
