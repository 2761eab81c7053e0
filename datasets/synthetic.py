"""Synthetic Criteo-like data with a planted teacher — the embedded default dataset.

Each of the 26 categorical fields draws values from a Zipf law (a few head values, a long
tail) over a vocabulary shaped like Criteo Kaggle's, scaled down by ``scale``. Labels come
from a *teacher*: per-value biases + low-rank pairwise interactions between fields + dense
effects, through a logistic with a base rate near 0.25. Fields carry strong, weak or no
signal. The teacher's own AUC on the test split is recorded in ``meta.json`` — the ceiling no
model can beat.

The teacher's per-value parameters are i.i.d. across values — a deliberate choice. Real
categorical data has structure among rare values (a new ad of a known advertiser), but a
planted cluster structure would have to be keyed by *something* the models see: keyed by
frequency rank (neighbouring ids share a cluster) it would hand QR's quotient tables and
TT-Rec's index digits exactly the sharing pattern they impose, keyed by a hash no method
could use it. Either would tilt the comparison. Instead ``ctr synth`` drops values seen fewer
than ``min_count = 10`` times in train into the OOV id 0, as Criteo preparation does, so
the budget ratios count only rows a model can learn and the rare values' i.i.d. noise does
not reward methods merely for sharing it. (``SyntheticConfig.min_count`` itself defaults to 1
so library callers and tests keep every value.)

Teacher parameters are hashes of (seed, field, value), never tables, so a 10 M-value field
costs no memory; rows are generated in seeded chunks, so 10 M rows never sit in memory and
the two passes (count frequencies, then encode) see identical data.

Example::

    meta = generate_synthetic("data/synth", SyntheticConfig(rows=200_000, scale=0.001))
    meta.extra["teacher"]["test_auc"]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from datasets.io import replace_dir
from datasets.prepared import (
    SPLITS,
    DatasetMeta,
    ShardWriter,
    SparseField,
    arrow_schema,
    encoded_counts,
    frequency_order,
    is_prepared_dataset,
    save_frequencies,
    save_vocab,
)
from datasets.progress import progress_bar

# Distinct values per categorical field in Criteo Kaggle's train.txt (C1..C26).
CRITEO_KAGGLE_CARDINALITIES = (
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
)
SIGNAL_PATTERN = (1.0, 0.5, 0.2, 0.0)  # per-field strength, cycled: strong, weak, faint, none
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class SyntheticConfig:
    """How to generate a synthetic dataset.

    ``scale`` multiplies the Criteo cardinalities (fields of at most ``min_field_size`` values
    keep their size); ``cardinalities`` overrides them entirely.
    """

    rows: int = 1_000_000
    scale: float = 0.01
    cardinalities: tuple[int, ...] | None = None
    min_field_size: int = 32
    num_dense: int = 13
    multi_hot_fields: int = 0
    max_multi_hot: int = 5
    zipf_exponent: float = 1.1
    interaction_rank: int = 4
    base_rate: float = 0.25
    bias_std: float = 1.0
    interaction_std: float = 0.8
    dense_std: float = 0.4
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    min_count: int = 1
    seed: int = 0
    chunk_rows: int = 1 << 18
    rows_per_shard: int = 1 << 20

    def field_sizes(self) -> list[int]:
        if self.cardinalities is not None:
            sizes = list(self.cardinalities)
        else:
            sizes = [
                c if c <= self.min_field_size else max(self.min_field_size, round(c * self.scale))
                for c in CRITEO_KAGGLE_CARDINALITIES
            ]
        sizes += [max(self.min_field_size, 64)] * self.multi_hot_fields
        if any(s < 1 for s in sizes):
            raise ValueError(f"every field needs at least one value, got sizes {sizes}")
        return sizes

    def validate(self) -> None:
        if self.rows < 10:
            raise ValueError(f"rows must be at least 10, got {self.rows}")
        if not 0 < self.valid_fraction + self.test_fraction < 1:
            raise ValueError("valid_fraction + test_fraction must lie in (0, 1)")
        if self.zipf_exponent <= 0 or self.zipf_exponent == 1.0:
            raise ValueError("zipf_exponent must be positive and not exactly 1")
        if not 0 < self.base_rate < 1:
            raise ValueError("base_rate must lie in (0, 1)")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash_normal(seed: int, field: int, component: int, values: np.ndarray) -> np.ndarray:
    """A standard normal draw that is a pure function of (seed, field, component, value)."""
    key = splitmix64(np.uint64(seed * 1_000_003 + field * 131 + component))
    h1 = splitmix64(values.astype(np.uint64) ^ key)
    h2 = splitmix64(h1)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _zipf_ranks(rng: np.random.Generator, n: int, a: float, size: int) -> np.ndarray:
    """Ranks in [0, n) with P(rank = r) ≈ ∝ (r+1)^-a, by inverting the continuous CDF."""
    u = rng.random(size)
    top = (n + 1.0) ** (1.0 - a)
    x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - a))
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


@dataclass
class _Chunk:
    start: int
    ranks: np.ndarray  # [rows, single-hot fields] raw value ranks
    multi_values: list[np.ndarray]  # per multi-hot field: flat raw ranks
    multi_lengths: list[np.ndarray]  # per multi-hot field: values per row
    dense: np.ndarray  # [rows, num_dense] log1p-transformed
    raw_logit: np.ndarray  # teacher components before scaling: [3, rows]


class _Generator:
    def __init__(self, config: SyntheticConfig) -> None:
        config.validate()
        self.config = config
        self.sizes = config.field_sizes()
        self.num_single = len(self.sizes) - config.multi_hot_fields
        self.strength = np.array(
            [SIGNAL_PATTERN[f % len(SIGNAL_PATTERN)] for f in range(len(self.sizes))]
        )
        rng = np.random.default_rng([config.seed, 7])
        self.dense_mu = rng.uniform(0.5, 3.0, config.num_dense)
        self.dense_sigma = rng.uniform(0.5, 1.5, config.num_dense)
        self.dense_weight = rng.normal(0.0, 1.0, config.num_dense) * (
            np.arange(config.num_dense) % 3 != 2
        )  # every third dense feature carries no signal
        self.scales = np.ones(3)
        self.intercept = 0.0
        self._calibrate()

    def chunk(self, index: int, start: int, rows: int, seed_offset: int = 0) -> _Chunk:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, seed_offset, index])
        ranks = (
            np.stack(
                [
                    _zipf_ranks(rng, n, cfg.zipf_exponent, rows)
                    for n in self.sizes[: self.num_single]
                ],
                axis=1,
            )
            if self.num_single
            else np.zeros((rows, 0), dtype=np.int64)
        )
        multi_values, multi_lengths = [], []
        for n in self.sizes[self.num_single :]:
            lengths = np.clip(rng.poisson(1.5, rows) + 1, 1, cfg.max_multi_hot)
            multi_lengths.append(lengths)
            multi_values.append(_zipf_ranks(rng, n, cfg.zipf_exponent, int(lengths.sum())))
        raw_dense = np.floor(
            np.exp(rng.normal(self.dense_mu, self.dense_sigma, (rows, cfg.num_dense)))
        )
        dense = np.log1p(raw_dense).astype(np.float32)
        chunk = _Chunk(start, ranks, multi_values, multi_lengths, dense, np.zeros((3, rows)))
        chunk.raw_logit = self._components(chunk)
        return chunk

    def logits(self, chunk: _Chunk) -> np.ndarray:
        return self.intercept + self.scales @ chunk.raw_logit

    def _components(self, chunk: _Chunk) -> np.ndarray:
        cfg = self.config
        rows = chunk.dense.shape[0]
        bias = np.zeros(rows)
        u_sum = np.zeros((rows, cfg.interaction_rank))
        u_sq = np.zeros(rows)
        fields = [(f, chunk.ranks[:, f], None) for f in range(self.num_single)]
        fields += [
            (self.num_single + m, v, ln)
            for m, (v, ln) in enumerate(zip(chunk.multi_values, chunk.multi_lengths, strict=True))
        ]
        for f, values, lengths in fields:
            s = self.strength[f]
            if s == 0.0:
                continue
            b = s * _hash_normal(cfg.seed, f, 0, values)
            u = s * np.stack(
                [_hash_normal(cfg.seed, f, 1 + k, values) for k in range(cfg.interaction_rank)], 1
            )
            if lengths is not None:  # multi-hot: the mean over the bag
                seg = np.repeat(np.arange(rows), lengths)
                b = np.bincount(seg, b, rows) / lengths
                u = np.stack([np.bincount(seg, u[:, k], rows) for k in range(u.shape[1])], 1)
                u /= lengths[:, None]
            bias += b
            u_sum += u
            u_sq += (u * u).sum(1)
        interaction = 0.5 * ((u_sum * u_sum).sum(1) - u_sq)
        z = (chunk.dense - self.dense_mu) / self.dense_sigma
        dense = z @ self.dense_weight
        return np.stack([bias, interaction, dense])

    def _calibrate(self) -> None:
        """Scale each component to its target std, then fit the intercept to the base rate."""
        cfg = self.config
        sample = self.chunk(0, 0, 50_000, seed_offset=1)
        targets = np.array([cfg.bias_std, cfg.interaction_std, cfg.dense_std])
        stds = sample.raw_logit.std(axis=1)
        self.scales = np.where(stds > 0, targets / np.maximum(stds, 1e-12), 0.0)
        centred = self.scales @ sample.raw_logit
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisection on the mean click probability
            mid = 0.5 * (lo + hi)
            if (1.0 / (1.0 + np.exp(-(centred + mid)))).mean() > cfg.base_rate:
                hi = mid
            else:
                lo = mid
        self.intercept = 0.5 * (lo + hi)


def _split_bounds(config: SyntheticConfig) -> dict[str, tuple[int, int]]:
    n_valid = max(1, round(config.rows * config.valid_fraction))
    n_test = max(1, round(config.rows * config.test_fraction))
    n_train = config.rows - n_valid - n_test
    return {
        "train": (0, n_train),
        "valid": (n_train, n_train + n_valid),
        "test": (n_train + n_valid, config.rows),
    }


def _chunks(gen: _Generator) -> Iterator[_Chunk]:
    """The dataset's chunks; both passes draw exactly these, so counts match what is written."""
    size, rows = gen.config.chunk_rows, gen.config.rows
    for index, start in enumerate(range(0, rows, size)):
        yield gen.chunk(index, start, min(size, rows - start))


def generate_synthetic(
    out: str | Path,
    config: SyntheticConfig = SyntheticConfig(),
    progress: bool = True,
    overwrite: bool = False,
) -> DatasetMeta:
    """Writes a prepared dataset to ``out`` and returns its metadata (see module docstring).

    ``out`` must be absent or empty, or hold a prepared dataset and ``overwrite`` be set; the
    dataset is written beside it and renamed into place when complete.
    """
    final = Path(out)
    with replace_dir(final, "prepared dataset", is_prepared_dataset, overwrite) as staging:
        meta = _write_synthetic(staging, config, progress)
    meta.root = final
    return meta


def _write_synthetic(out: Path, config: SyntheticConfig, progress: bool) -> DatasetMeta:
    gen = _Generator(config)
    bounds = _split_bounds(config)
    n_train = bounds["train"][1]
    names = [f"C{i + 1}" for i in range(gen.num_single)]
    names += [f"M{i + 1}" for i in range(config.multi_hot_fields)]
    dense_names = [f"I{i + 1}" for i in range(config.num_dense)]

    # Pass 1: train-split counts per raw value.
    counts = [np.zeros(n, dtype=np.int64) for n in gen.sizes]
    bar = progress_bar(n_train + config.rows, "synth", unit="rows", show=progress)
    for chunk in _chunks(gen):
        if chunk.start >= n_train:
            break
        keep = min(len(chunk.dense), n_train - chunk.start)
        for f in range(gen.num_single):
            counts[f] += np.bincount(chunk.ranks[:keep, f], minlength=gen.sizes[f])
        for m, (values, lengths) in enumerate(
            zip(chunk.multi_values, chunk.multi_lengths, strict=True)
        ):
            kept_values = values[: int(lengths[:keep].sum())]
            counts[gen.num_single + m] += np.bincount(
                kept_values, minlength=gen.sizes[gen.num_single + m]
            )
        bar.update(keep)
    remaps, cards = zip(*(frequency_order(c, config.min_count) for c in counts), strict=True)
    sparse = [
        SparseField(name, card, multi_hot=i >= gen.num_single)
        for i, (name, card) in enumerate(zip(names, cards, strict=True))
    ]

    # Pass 2: regenerate the same chunks, encode, write, and score the teacher.
    label = "label"
    schema = arrow_schema(label, dense_names, sparse)
    writers = {s: ShardWriter(out, s, schema, config.rows_per_shard) for s in SPLITS}
    scored: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"valid": [], "test": []}
    for index, chunk in enumerate(_chunks(gen)):
        start = chunk.start
        logit = gen.logits(chunk)
        p = 1.0 / (1.0 + np.exp(-logit))
        labels = (np.random.default_rng([config.seed, 2, index]).random(len(p)) < p).astype(
            np.float32
        )
        columns: dict[str, pa.Array] = {label: pa.array(labels)}
        for j, d in enumerate(dense_names):
            columns[d] = pa.array(chunk.dense[:, j])
        for f in range(gen.num_single):
            columns[names[f]] = pa.array(remaps[f][chunk.ranks[:, f]].astype(np.int32))
        for m, (values, lengths) in enumerate(
            zip(chunk.multi_values, chunk.multi_lengths, strict=True)
        ):
            f = gen.num_single + m
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            columns[names[f]] = pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(remaps[f][values].astype(np.int32))
            )
        table = pa.table(columns)
        for split, (lo, hi) in bounds.items():
            a, b = max(lo, start) - start, min(hi, start + len(p)) - start
            if a >= b:
                continue
            writers[split].write(table.slice(a, b - a))
            if split in scored:
                scored[split].append((p[a:b], labels[a:b]))
        bar.update(len(p))
    bar.close()

    from sklearn.metrics import log_loss, roc_auc_score  # only needed here; slow to import

    teacher = {"base_rate": config.base_rate}
    for split, parts in scored.items():
        p = np.concatenate([x for x, _ in parts])
        y = np.concatenate([y for _, y in parts])
        teacher[f"{split}_auc"] = float(roc_auc_score(y, p)) if 0 < y.mean() < 1 else float("nan")
        teacher[f"{split}_logloss"] = float(log_loss(y, p, labels=[0, 1]))
        teacher[f"{split}_ctr"] = float(y.mean())
    save_frequencies(
        out,
        {s.name: encoded_counts(remaps[i], counts[i], s.cardinality) for i, s in enumerate(sparse)},
    )
    # Raw values of a synthetic field are its Zipf ranks, written as decimal strings.
    save_vocab(
        out,
        {
            s.name: (np.flatnonzero(remaps[i]).astype(str), remaps[i][remaps[i] > 0])
            for i, s in enumerate(sparse)
        },
    )
    meta = DatasetMeta(
        name="synthetic-criteo",
        label=label,
        dense=dense_names,
        sparse=sparse,
        splits={s: w.close() for s, w in writers.items()},
        options={"generator": "synthetic", **asdict(config)},
        extra={"teacher": teacher},
        root=out,
    )
    meta.save(out)
    return meta
