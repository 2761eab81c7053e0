"""Moved to ``datasets.readers.movielens``; this name stays for one release."""

from datasets.readers.movielens import (  # noqa: F401
    GENRE_SEPARATOR,
    GENRES_100K,
    MOVIELENS_COLUMNS,
    RATING_COLUMNS,
    USER_ATTRIBUTES,
    YEAR_PATTERN,
    MovieLensConfig,
    MovieLensFormat,
    MovieLensReader,
    prepare_movielens,
)
