"""MovieLens ml-100k and ml-1m: ratings joined with user and movie attributes.

Give the unpacked directory. ml-100k: ``u.data`` (tab: user, item, rating, timestamp),
``u.user`` (``|``: user, age, gender, occupation, zip), ``u.item`` (``|``, Latin-1: item,
title, release date, video release date, IMDb URL, 19 genre flags). ml-1m: ``ratings.dat``,
``users.dat`` (user, gender, age, occupation, zip) and ``movies.dat`` (item, title,
``|``-joined genres), ``::``-separated, Latin-1.

Label: ``rating >= positive_rating`` (4 by default). Sparse fields: user_id, item_id,
gender, age, occupation, zip, year (from the title's trailing ``(YYYY)``; optional) and
genres (multi-hot). A rating whose user or movie is missing from the attribute files is
an ``unknown_id`` bad row.

Example::

    meta = prepare_movielens("ml-1m", "data/ml-1m", MovieLensConfig(positive_rating=4))
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets.prepare.base import Format, PrepareOptions
from datasets.prepare.columns import Features, Issues, parse_numbers, token_lists
from datasets.prepare.engine import prepare_dataset
from datasets.prepare.sources import BadInputError, RawChunk, Rejection, TextSource, read_all
from datasets.prepare.splits import FileReader, standard_split
from datasets.prepared import DatasetMeta
from datasets.readers.base import Reader

# u.item's genre flags, in file order.
GENRES_100K = (
    "unknown|Action|Adventure|Animation|Children's|Comedy|Crime|Documentary|Drama|Fantasy|"
    "Film-Noir|Horror|Musical|Mystery|Romance|Sci-Fi|Thriller|War|Western"
).split("|")
RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
USER_ATTRIBUTES = ["gender", "age", "occupation", "zip"]
MOVIELENS_COLUMNS = [*RATING_COLUMNS, *USER_ATTRIBUTES, "title", "genres"]
GENRE_SEPARATOR = "|"
YEAR_PATTERN = r"\((?P<year>\d{4})\)\s*$"


@dataclass(frozen=True)
class MovieLensConfig:
    positive_rating: float = 4.0
    year: bool = True


class MovieLensFormat(Format):
    name = "movielens"
    label_columns = ("rating",)
    dropped_columns = ("timestamp",)

    def __init__(self, config: MovieLensConfig = MovieLensConfig()) -> None:
        super().__init__(config)
        self.columns = MOVIELENS_COLUMNS
        self.dense = []
        self.sparse = [
            "user_id",
            "item_id",
            *USER_ATTRIBUTES,
            *(["year"] if config.year else []),
            "genres",
        ]
        self.multi_valued = {"genres": GENRE_SEPARATOR}

    @property
    def sources(self) -> dict[str, str]:
        return {f: "title" if f == "year" else f for f in self.sparse}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MovieLensFormat:
        return cls(MovieLensConfig(**config))

    def transform(self, raw: pa.Table, issues: Issues, labeled: bool = True) -> Features:
        label = None
        if labeled:
            rating = parse_numbers(raw["rating"], "rating", issues, reason="bad_label")
            issues.flag("bad_label", "rating", np.isnan(rating), raw["rating"])
            label = (np.nan_to_num(rating) >= self.config.positive_rating).astype(np.float32)
        tokens = {c: raw[c] for c in ("user_id", "item_id", *USER_ATTRIBUTES)}
        if self.config.year:
            tokens["year"] = pc.struct_field(pc.extract_regex(raw["title"], YEAR_PATTERN), [0])
        tokens["genres"] = token_lists(raw["genres"], GENRE_SEPARATOR)
        return Features(label, {}, tokens)


class MovieLensReader(FileReader):
    """Streams the ratings file and joins each chunk with the (small) attribute tables."""

    def __init__(self, root: Path) -> None:
        if (root / "u.data").is_file():
            self.variant = "100k"
            ratings = TextSource(root / "u.data", RATING_COLUMNS, "\t")
            users = TextSource(
                root / "u.user", ["user_id", "age", "gender", "occupation", "zip"], "|"
            )
            items = TextSource(
                root / "u.item",
                ["item_id", "title", "release_date", "video_date", "url", *GENRES_100K],
                "|",
                encoding="latin-1",
            )
        elif (root / "ratings.dat").is_file():
            self.variant = "1m"
            ratings = TextSource(root / "ratings.dat", RATING_COLUMNS, "::")
            users = TextSource(
                root / "users.dat", ["user_id", *USER_ATTRIBUTES], "::", encoding="latin-1"
            )
            items = TextSource(
                root / "movies.dat", ["item_id", "title", "genres"], "::", encoding="latin-1"
            )
        else:
            raise BadInputError(f"{root}: neither ml-100k (u.data) nor ml-1m (ratings.dat) files")
        super().__init__([ratings])
        for s in (users, items):
            if not s.path.is_file():
                raise BadInputError(f"{s.path}: no such file (needed for the {self.variant} join)")
        self.users, _, rejected = read_all(users)
        self.side_rejected = list(rejected)
        items_table, lines, rejected = read_all(items)
        self.side_rejected += rejected
        if self.variant == "100k":
            items_table = self._genre_lists(items_table, lines, str(items.path))
        self.items = items_table.select(["item_id", "title", "genres"])

    def chunks(
        self, source: int, block_bytes: int, span: tuple[int, int, int] | None = None
    ) -> Iterator[RawChunk]:
        for chunk in super().chunks(source, block_bytes, span):
            yield self._join(chunk)

    def _join(self, chunk: RawChunk) -> RawChunk:
        user = pc.index_in(chunk.table["user_id"], value_set=self.users["user_id"])
        item = pc.index_in(chunk.table["item_id"], value_set=self.items["item_id"])
        known = pc.and_(user.is_valid(), item.is_valid()).to_numpy(zero_copy_only=False)
        rejected = list(chunk.rejected)
        for i in np.flatnonzero(~known):
            which = "user" if not user[i].is_valid else "movie"
            value = chunk.table[f"{'user' if which == 'user' else 'item'}_id"][i].as_py()
            rejected.append(
                Rejection(
                    "unknown_id",
                    chunk.path,
                    int(chunk.lines[i]),
                    f"{which} {value!r} is not in the attribute file",
                )
            )
        keep = pa.array(known)
        table = chunk.table.filter(keep)
        user, item = user.filter(keep), item.filter(keep)
        columns = {c: table[c] for c in RATING_COLUMNS}
        columns.update({c: self.users[c].take(user) for c in USER_ATTRIBUTES})
        columns.update({c: self.items[c].take(item) for c in ("title", "genres")})
        return RawChunk(
            chunk.path,
            pa.table(columns),
            chunk.lines[known],
            chunk.positions[known],
            sorted(rejected, key=lambda r: r.line),
        )

    def _genre_lists(self, items: pa.Table, lines: np.ndarray, path: str) -> pa.Table:
        """ml-100k's 19 genre flags -> a list of genre names; a flag other than 0/1 is bad."""
        flags = np.stack(
            [
                pc.equal(items[g], "1").fill_null(False).to_numpy(zero_copy_only=False)
                for g in GENRES_100K
            ],
            axis=1,
        )
        valid = np.stack(
            [
                pc.is_in(items[g], pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
                for g in GENRES_100K
            ],
            axis=1,
        )
        for row in np.flatnonzero(~valid.all(axis=1)):
            genre = GENRES_100K[int(np.argmin(valid[row]))]
            self.side_rejected.append(
                Rejection("bad_value", path, int(lines[row]), f"genre flag {genre!r} is not 0 or 1")
            )
        rows, genre = np.nonzero(flags & valid.all(axis=1, keepdims=True))
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(items)))])
        names = pa.array(np.asarray(GENRES_100K, dtype=object)[genre], pa.string())
        genres = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), names)
        return items.append_column("genres", genres).filter(pa.array(valid.all(axis=1)))


def prepare_movielens(
    root: str | os.PathLike,
    out: str | os.PathLike,
    config: MovieLensConfig | None = None,
    options: PrepareOptions | None = None,
) -> DatasetMeta:
    """Prepares an unpacked ml-100k or ml-1m directory (``options.split``: ``random``
    (default) or ``ordered``; ``options.min_count`` defaults to 1)."""
    options = (options or PrepareOptions()).with_defaults(min_count=1, split="random")
    root = Path(root)
    reader = MovieLensReader(root if root.is_dir() else root.parent)
    fmt = MovieLensFormat(config or MovieLensConfig())
    return prepare_dataset(
        fmt,
        reader,
        out,
        standard_split(reader, options),
        options,
        name=f"movielens-{reader.variant}",
    )


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="DIR", help="unpacked ml-100k or ml-1m directory")
    p.add_argument(
        "--positive-rating",
        type=float,
        default=4.0,
        help="ratings at or above this are positives (default 4)",
    )
    p.add_argument("--no-year", action="store_true", help="no year field from the titles")


READER = Reader(
    name="movielens",
    format=MovieLensFormat,
    help="MovieLens ml-100k or ml-1m directory (ratings joined with users and movies)",
    example="ctr prepare movielens ml-1m --out data/ml-1m --positive-rating 4",
    add_arguments=_arguments,
    prepare=lambda a, o: prepare_movielens(
        a.path, a.out, MovieLensConfig(a.positive_rating, year=not a.no_year), o
    ),
)
