"""What the engine asks of a raw format and of its caller: :class:`Format` and
:class:`PrepareOptions`.

A reader (``datasets/readers/<name>.py``) subclasses :class:`Format`: its raw columns, which
become the label, dense floats and categorical tokens, and a vectorised ``transform`` that
flags bad rows instead of raising. :class:`PrepareOptions` are the options every format
shares (``ctr prepare``'s common flags).

Example::

    options = PrepareOptions(min_count=10, split="random").with_defaults(min_count=1, split="days")
    options.validate()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from datasets.prepare.columns import Features, Issues
from datasets.prepared import SparseField

LABEL = "label"  # the label column of every prepared dataset, whatever the raw name
BAD_ROW_POLICIES = ("skip", "fail")
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class PrepareOptions:
    """Options every format shares.

    ``min_count``/``split`` left as ``None`` take the format's default (Criteo: 10 and the
    7-day protocol; see each ``prepare_*`` function). ``fractions`` are train/valid/test
    shares for the ``random`` and ``ordered`` splits. ``block_bytes`` of raw text are read
    and encoded at a time (more when the vocabulary is large, see :func:`encode_block_bytes`);
    peak memory is a few such blocks, one shard per split, plus the vocabulary.
    ``max_dropped_fraction``: a run whose bad rows exceed this share of the lines read fails
    instead of writing ``meta.json`` (a broken join or a wrong schema drops most rows; that
    must not pass for a dataset).

    ``workers`` > 1 runs both passes over that many processes (``executor="local"``) or
    as Ray tasks (``executor="ray"``: on the cluster at ``address``, or a private local
    instance when it is ``None`` or ``"local"``); the ids, rows and shards are those of one
    process (see :mod:`datasets.prepare.parallel`). One worker on ``local`` is the serial
    engine itself.
    """

    min_count: int | None = None
    split: str | None = None
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    on_bad_row: str = "skip"
    overwrite: bool = False
    progress: bool = True
    block_bytes: int = 8 << 20
    rows_per_shard: int = 1 << 20
    max_examples: int = 5
    max_dropped_fraction: float = 0.05
    workers: int = 1
    executor: str = "local"
    address: str | None = None

    @property
    def parallel(self) -> bool:
        return self.workers > 1 or self.executor != "local"

    def validate(self) -> None:
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(
                f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {self.on_bad_row!r}"
            )
        if self.min_count is not None and self.min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {self.min_count}")
        if len(self.fractions) != 3 or min(self.fractions) < 0 or self.fractions[0] <= 0:
            raise ValueError(
                f"fractions must be 3 non-negative shares with train > 0, got {self.fractions}"
            )
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"fractions must sum to 1, got {self.fractions} (sum {sum(self.fractions)})"
            )
        if not 0.0 <= self.max_dropped_fraction <= 1.0:
            raise ValueError(
                f"max_dropped_fraction must be in [0, 1], got {self.max_dropped_fraction}"
            )
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers must be a whole number >= 1, got {self.workers!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.block_bytes < 1 << 10 or self.rows_per_shard < 1:
            raise ValueError("block_bytes must be at least 1 KiB and rows_per_shard positive")

    def with_defaults(self, min_count: int, split: str) -> PrepareOptions:
        """These options with a format's defaults filled in where they were left ``None``."""
        return replace(
            self,
            min_count=self.min_count if self.min_count is not None else min_count,
            split=self.split or split,
        )


class Format(ABC):
    """How one dataset's raw columns become a label, dense floats and categorical tokens.

    Subclasses set ``name`` and, in ``__init__``, ``columns`` (raw columns, file order),
    ``label_columns``, ``dropped_columns``, ``dense``, ``sparse`` and ``multi_valued``; the
    ``transform`` must be vectorised over a chunk and must also work with ``labeled=False``
    (serving: records carry no label).
    """

    name: ClassVar[str]
    columns: list[str]
    label_columns: tuple[str, ...]
    dropped_columns: tuple[str, ...] = ()
    dense: list[str]
    sparse: list[str]
    # Multi-valued raw columns, each the multi-hot field of the same name, with the separator
    # that joins their values in text.
    multi_valued: dict[str, str] = {}

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def feature_columns(self) -> list[str]:
        """The raw fields a record may give :class:`RawEncoder` (no label, no dropped column)."""
        skip = {*self.label_columns, *self.dropped_columns}
        return [c for c in self.columns if c not in skip]

    def sparse_fields(self, cardinalities: dict[str, int]) -> list[SparseField]:
        return [SparseField(f, cardinalities[f], f in self.multi_valued) for f in self.sparse]

    def describe(self) -> dict[str, Any]:
        """What ``meta.json`` records to rebuild this format (see :meth:`from_config`)."""
        return {"format": self.name, "config": asdict(self.config)}

    @property
    def sources(self) -> dict[str, str] | None:
        """Each feature (dense and sparse) -> the one raw column its value is computed from,
        when every feature depends on one column of its own row only; ``None`` (the default)
        when that is not declared. Serving memoises encodings per raw value with it."""
        return None

    @property
    def fitted_fields(self) -> list[str]:
        """Sparse fields whose vocabulary :meth:`fit` derives from train statistics (quantile
        buckets) instead of counted tokens; ``transform`` yields their tokens once fitted."""
        return []

    def observe(self, features: Features, train: np.ndarray) -> None:  # noqa: B027
        """Pass 1 shows each chunk's features and its train-row mask (for :meth:`fit`)."""

    def fit(self) -> dict[str, list[str]]:
        """After pass 1: each fitted field's tokens in id order (id 1 first)."""
        return {}

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> Format:
        """The format described by ``meta.options["config"]``."""

    @abstractmethod
    def transform(self, raw: pa.Table, issues: Issues, labeled: bool = True) -> Features:
        """Raw string columns -> features; flags bad rows in ``issues`` instead of raising."""

    def transform_columns(self, raw: pa.Table, issues: Issues) -> Features | None:
        """Unlabelled features of a table holding only some feature columns: the features
        :attr:`sources` derives from those columns, without the others' work (a transform's
        cost is mostly a fixed cost per column). ``None`` (the default) where the format does
        not offer it: the caller transforms a whole table. Serving encodes the values its
        memo has not seen with it, so one new value costs its own column's work."""
        return None
