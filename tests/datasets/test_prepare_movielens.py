"""``prepare movielens`` on tiny ml-100k and ml-1m directories (Latin-1 titles, genres).

ml-100k's u.data line 13 rates a movie absent from u.item; ml-1m's ratings.dat line 5 has
three fields.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from datasets.encode import RawEncoder
from datasets.loader import BatchLoader
from datasets.prepare import BadInputError
from datasets.prepared import load_vocab
from datasets.readers.movielens import GENRES_100K, MovieLensConfig, prepare_movielens
from tests.helpers.prepare_support import FIXTURES, decode, options, read_all_splits, read_split

ML_100K, ML_1M = FIXTURES / "ml-100k", FIXTURES / "ml-1m"
ALL_TRAIN = {"split": "ordered", "fractions": (1.0, 0.0, 0.0)}


def _records_100k() -> list[dict]:
    users = {
        f[0]: f for f in (line.split("|") for line in (ML_100K / "u.user").read_text().splitlines())
    }
    items = {}
    for line in (ML_100K / "u.item").read_bytes().decode("latin-1").splitlines():
        f = line.split("|")
        items[f[0]] = (f[1], [g for g, flag in zip(GENRES_100K, f[5:], strict=True) if flag == "1"])
    out = []
    for n, line in enumerate((ML_100K / "u.data").read_text().splitlines(), 1):
        user, item, rating, _ = line.split("\t")
        if n == 13:
            continue
        u = users[user]
        out.append(
            {
                "user_id": user,
                "item_id": item,
                "rating": int(rating),
                "age": u[1],
                "gender": u[2],
                "occupation": u[3],
                "zip": u[4],
                "title": items[item][0],
                "genres": items[item][1],
            }
        )
    return out


def _records_1m() -> list[dict]:
    def read(name):
        text = (ML_1M / name).read_bytes().decode("latin-1")
        return [line.split("::") for line in text.splitlines()]

    users = {f[0]: f for f in read("users.dat")}
    movies = {f[0]: f for f in read("movies.dat")}
    out = []
    for n, f in enumerate(read("ratings.dat"), 1):
        if n == 5:
            continue
        u, m = users[f[0]], movies[f[1]]
        out.append(
            {
                "user_id": f[0],
                "item_id": f[1],
                "rating": int(f[2]),
                "gender": u[1],
                "age": u[2],
                "occupation": u[3],
                "zip": u[4],
                "title": m[1],
                "genres": m[2].split("|"),
            }
        )
    return out


def _year(title: str) -> str | None:
    match = re.search(r"\((\d{4})\)\s*$", title)
    return match.group(1) if match else None


@pytest.mark.parametrize(
    "root, records, bad",
    [
        (ML_100K, _records_100k, {"unknown_id": f"{ML_100K / 'u.data'}:13"}),
        (ML_1M, _records_1m, {"wrong_column_count": f"{ML_1M / 'ratings.dat'}:5"}),
    ],
)
def test_ratings_joined_with_users_and_movies(tmp_path, root, records, bad):
    meta = prepare_movielens(root, tmp_path, options=options(**ALL_TRAIN))
    expected = records()
    table = read_all_splits(tmp_path)
    assert table.num_rows == len(expected) == 29
    assert {k: v["examples"] for k, v in meta.bad_rows.items()} == {k: [v] for k, v in bad.items()}
    assert table["label"].to_pylist() == [float(r["rating"] >= 4) for r in expected]
    for field in ("user_id", "item_id", "gender", "age", "occupation", "zip"):
        assert decode(tmp_path, field, table[field].to_pylist()) == [r[field] for r in expected]
    assert decode(tmp_path, "year", table["year"].to_pylist()) == [
        _year(r["title"]) for r in expected
    ]
    genres = [decode(tmp_path, "genres", ids) for ids in table["genres"].to_pylist()]
    assert genres == [r["genres"] for r in expected]
    assert meta.sparse[-1].name == "genres" and meta.sparse[-1].multi_hot
    assert meta.name == f"movielens-{'100k' if root == ML_100K else '1m'}"


def test_latin1_titles_are_decoded(tmp_path):
    prepare_movielens(ML_1M, tmp_path / "1m", options=options(**ALL_TRAIN))
    assert "1986" in load_vocab(tmp_path / "1m")["year"]  # "Ménage (Tenue de soirée) (1986)"
    items = (ML_100K / "u.item").read_bytes()
    assert "Misérables".encode("latin-1") in items and b"\xc3" not in items
    prepare_movielens(ML_100K, tmp_path / "100k", options=options(**ALL_TRAIN))
    years = load_vocab(tmp_path / "100k")["year"]
    assert set(years) == {"1995", "1994"}  # "unknown" has no year -> OOV


def test_positive_rating_and_no_year(tmp_path):
    meta = prepare_movielens(
        ML_1M, tmp_path, MovieLensConfig(positive_rating=5, year=False), options(**ALL_TRAIN)
    )
    assert "year" not in meta.sparse_names
    assert read_all_splits(tmp_path)["label"].to_pylist() == [
        float(r["rating"] >= 5) for r in _records_1m()
    ]
    assert meta.options["config"] == {"positive_rating": 5, "year": False}


def test_loader_yields_genre_bags(tmp_path):
    prepare_movielens(ML_100K, tmp_path, options=options())
    train = read_split(tmp_path, "train")
    batch = next(iter(BatchLoader(tmp_path, "train", batch_size=64)))
    bags = batch.sparse_features["genres"]
    np.testing.assert_array_equal(
        bags.lengths().numpy(), [len(g) for g in train["genres"].to_pylist()]
    )
    assert torch.equal(
        bags.values(), torch.tensor([i for g in train["genres"].to_pylist() for i in g])
    )


def test_missing_files_are_named(tmp_path):
    with pytest.raises(BadInputError, match="neither ml-100k"):
        prepare_movielens(tmp_path, tmp_path / "out", options=options())
    (tmp_path / "u.data").write_text("1\t1\t5\t0\n")
    with pytest.raises(BadInputError, match="u.user: no such file"):
        prepare_movielens(tmp_path, tmp_path / "out", options=options())


def test_joined_records_encode_to_the_prepared_rows(tmp_path):
    meta = prepare_movielens(ML_1M, tmp_path, options=options(**ALL_TRAIN, min_count=2))
    records = _records_1m()
    for r in records[::2]:  # genres may come joined, as in movies.dat
        r["genres"] = "|".join(r["genres"])
    encoded = RawEncoder.load(tmp_path).encode(records)
    table = read_all_splits(tmp_path)
    for field in meta.sparse_names:
        got = encoded.sparse[field]
        got = [g.tolist() for g in got] if field == "genres" else got.tolist()
        assert got == table[field].to_pylist(), field


def test_a_truncated_user_file_fails_instead_of_dropping_most_ratings(tmp_path):
    ml = tmp_path / "ml-100k"
    ml.mkdir()
    for name in ("u.data", "u.item"):
        (ml / name).write_bytes((ML_100K / name).read_bytes())
    (ml / "u.user").write_text((ML_100K / "u.user").read_text().splitlines()[0] + "\n")
    with pytest.raises(BadInputError) as failure:
        prepare_movielens(ml, tmp_path / "out", options=options(max_dropped_fraction=0.05))
    message = str(failure.value)
    assert re.search(r"out: \d+ of 30 rows were bad \(\d+\.\d%; unknown_id \d+, e\.g\. ", message)
    assert "u.data:" in message and "is not in the attribute file" in message
    assert "--max-dropped-fraction 0.05" in message
    assert not (tmp_path / "out" / "meta.json").exists()  # nothing `ctr train` would accept
    # Raising the limit is the user's explicit choice.
    meta = prepare_movielens(ml, tmp_path / "out", options=options(max_dropped_fraction=1.0))
    assert meta.rows("train") + meta.rows("valid") + meta.rows("test") == 11  # 30 - 19 bad
