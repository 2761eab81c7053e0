"""``qr`` — quotient–remainder compositional embeddings (Shi et al., KDD 2020, arXiv 1909.02107).

A field of ``n`` values gets two tables instead of one: ``⌈n/m⌉`` quotient rows and ``m``
remainder rows. Value ``v`` reads ``E_q[v // m]`` and ``E_r[v mod m]`` and combines them with
``op``: ``"mult"`` (element-wise product, the paper's default), ``"add"``, or ``"concat"``
(each table then has ``dim/2`` columns). Since ``v ↦ (v // m, v mod m)`` is injective on
``[0, n)`` (``n ≤ ⌈n/m⌉·m``), every value gets its own pair of rows: the compression comes
from sharing halves, not from collisions.

Budget: one collision count ``m`` for every compressed field, as in DLRM's
``--qr-collisions``. ``m`` is the smallest value whose layout fits, capped per field at
``⌈√n_f⌉`` (where ``⌈n/m⌉ + m`` is smallest: ``≈ 2·√n`` rows), so all fields shrink by about
the same factor ``1/m`` until the large ones bottom out; then the largest fields take
``m − 1`` while that still fits, so the budget is used rather than rounded away. Fields of at
most ``threshold`` values (DLRM's ``--qr-threshold``, 200) and fields that QR would not shrink
keep a full table. The smallest possible layout is ``≈ 2·√n_f`` rows per field; a budget
below that raises :class:`BudgetError`.

Keys: ``keys="id"`` (default) splits the id itself. ``keys="fingerprint"`` (set by
``EmbeddingLayer(keys="fingerprint")``, which then feeds each compressed field the 64-bit
fingerprint of the raw value instead of its id) first hashes the value into the field's
``⌈n/m⌉·m`` pairs, ``u = h(salt_f, v) mod ⌈n/m⌉·m``, and splits ``u``: the same tables and
bytes, no vocabulary needed to serve, at the price of hashing's collisions (values sharing a
``u`` share both rows). Fields kept full stay keyed by id.

Options: ``op`` (``mult`` | ``add`` | ``concat``), ``threshold``, ``storage``,
``init_scale``, ``keys`` (``id`` | ``fingerprint``) (``option_help`` says each).

Deviations from the paper (and DLRM's ``tricks/qr_embedding_bag.py``): DLRM initialises both
tables uniformly on ``[√(1/n), 1]`` (all positive). Here, with ``op="mult"``, both factors
start uniform on ``±√init_scale`` so that products start at the scale of every other method's
rows (``±init_scale``) and differ between values from the first step; ``add``/``concat`` use
``±init_scale``. (Starting the remainder table at 1, the identity of the product, trained
markedly worse in our runs: every value sharing a quotient starts identical.) DLRM pools each
bag per table before combining; with multi-hot fields we do the same (``op`` joins the pooled
vectors).

Example::

    layer = build_compressor("qr", features, dim=16, budget="10x")              # mult
    layer = build_compressor("qr", features, dim=16, budget="10x", op="concat")
    layer.hyperparameters()["collisions"]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from compressors.core.base import FeatureSpec
from compressors.core.hash64 import mix64, stable_salt
from compressors.core.layout import register_index_map
from compressors.core.registry import register
from compressors.core.storage import Lookup, TableSpec, check_dtype, row_bytes
from compressors.core.tables import TableLayout, TableMethod
from compressors.hashing.hash import DEFAULT_THRESHOLD, INT63, FanOutMap, budget_error

OPS = {"mult": "mult", "add": "sum", "concat": "sum"}  # QR op -> Combiner op


KEYS = ("id", "fingerprint")
SALT_TAG = "qr/"


@dataclass(frozen=True)
class QRRule:
    """One lookup of field ``field``: row ``u // divisor``, or ``u mod divisor`` if ``remainder``.

    ``u`` is the value itself, or with ``space > 0`` its salted hash ``h(salt, v) mod space``
    (fingerprint keys; both lookups of a field share salt and space, so they split the same
    ``u``). A full (uncompressed) field is the quotient lookup with ``divisor = 1``.
    """

    field: int
    divisor: int
    remainder: bool = False
    space: int = 0
    salt: int = 0


@register_index_map
class QuotientRemainderMap(FanOutMap):
    """Field ids -> quotient and remainder rows, all lookups in one vectorised pass."""

    kind = "quotient_remainder"

    def __init__(
        self, features: Sequence[str], lookup_keys: Sequence[str], rules: Sequence[QRRule]
    ) -> None:
        super().__init__(features, lookup_keys, [r.field for r in rules])
        if any(r.divisor < 1 or r.space < 0 for r in rules):
            raise ValueError("QR divisors must be positive and hash spaces non-negative")
        self.rules = list(rules)
        self.register_buffer("_divisor", torch.tensor([r.divisor for r in rules]), persistent=False)
        self.register_buffer(
            "_remainder", torch.tensor([r.remainder for r in rules]), persistent=False
        )
        self._any_hashed = any(r.space for r in rules)
        self.register_buffer(
            "_hashed", torch.tensor([r.space > 0 for r in rules]), persistent=False
        )
        # A space of 1 for unhashed lookups keeps the remainder defined (its result is unused).
        self.register_buffer(
            "_space", torch.tensor([max(r.space, 1) for r in rules]), persistent=False
        )
        self.register_buffer(
            "_mixed_salt", mix64(torch.tensor([r.salt for r in rules])), persistent=False
        )

    def rows(
        self, values: torch.Tensor, per_value: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if self._any_hashed:
            # salted_hash(v, salt) = mix64(v ^ mix64(salt)) & INT63, the salts mixed once.
            hashed = mix64(values ^ per_value(self._mixed_salt)) & INT63
            values = torch.where(
                per_value(self._hashed), torch.remainder(hashed, per_value(self._space)), values
            )
        divisor = per_value(self._divisor)
        return torch.where(
            per_value(self._remainder),
            torch.remainder(values, divisor),
            torch.div(values, divisor, rounding_mode="floor"),
        )

    def hashed_fields(self) -> list[str]:
        hashed = {r.field for r in self.rules if r.space}
        return [f for i, f in enumerate(self.features) if i in hashed]

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "rules": [asdict(r) for r in self.rules]}

    @classmethod
    def from_config(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> QuotientRemainderMap:
        return cls(
            config["features"], config["lookup_keys"], [QRRule(**r) for r in config["rules"]]
        )


def qr_rows(n: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Rows of QR fields of ``n`` values with ``m`` collisions: ``⌈n/m⌉ + m`` (broadcasting)."""
    return -(-n // np.maximum(m, 1)) + m


@register
class QR(TableMethod):
    """Quotient–remainder tables per field, combined by ``op`` (``mult``, ``add``, ``concat``)."""

    name = "qr"
    option_help = {
        "op": "how quotient and remainder rows combine: mult, add or concat",
        "keys": "id (split the id) or fingerprint (split a hash of the raw value's fingerprint; "
        "set by the layer's keys='fingerprint')",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        op: str = "mult",
        threshold: int = DEFAULT_THRESHOLD,
        storage: str = "fp32",
        init_scale: float = 0.01,
        keys: str = "id",
    ) -> None:
        if op not in OPS:
            raise ValueError(f"qr: unknown op {op!r}; choose from {sorted(OPS)}")
        if keys not in KEYS:
            raise ValueError(f"qr: keys must be one of {KEYS}, got {keys!r}")
        self.keys = keys
        if op == "concat":
            if dim % 2:
                raise ValueError(f"qr: op='concat' needs an even dim, got {dim}")
            check_dtype(storage, dim // 2)
        self.op = op
        self.threshold = threshold
        super().__init__(features, dim, budget_bytes, storage=storage, init_scale=init_scale)
        if op == "mult":
            # Both factors at ±√init_scale, so products start at the scale of other rows.
            bound = math.sqrt(init_scale)
            weights = self.tables.weights()
            with torch.no_grad():
                for name in self.collisions:
                    weights[f"q_{name}"].uniform_(-bound, bound)
                    weights[f"r_{name}"].uniform_(-bound, bound)

    @property
    def _qr_dim(self) -> int:
        return self.dim // 2 if self.op == "concat" else self.dim

    def solve_layout(self) -> TableLayout:
        sizes = np.array([f.cardinality for f in self.features], dtype=np.int64)
        m = self._solve_collisions(sizes, sizes <= self.threshold)
        if m is None:
            m = self._solve_collisions(sizes, np.zeros(len(sizes), dtype=bool))
        if m is None:
            needed = self._bytes(
                sizes, np.zeros(len(sizes), dtype=bool), np.ceil(np.sqrt(sizes)).astype(np.int64)
            )
            raise budget_error(
                self.name,
                int(needed),
                self.budget_bytes,
                self.full_bytes,
                "the smallest QR layout (m = ceil(sqrt(n)) collisions: about 2*sqrt(n) rows "
                "per field) does not fit",
            )
        self.collisions = {f.name: int(c) for f, c in zip(self.features, m, strict=True) if c > 1}
        tables: list[TableSpec] = []
        lookups: list[Lookup] = []
        rules: list[QRRule] = []
        half = self._qr_dim
        for i, (f, c) in enumerate(zip(self.features, m, strict=True)):
            if c <= 1:
                tables.append(TableSpec(f"t_{f.name}", f.cardinality, self.dim, self.storage))
                lookups.append(Lookup(f.name, f"t_{f.name}", field=i))
                rules.append(QRRule(i, 1))
                continue
            tables += [
                TableSpec(f"q_{f.name}", -(-f.cardinality // int(c)), half, self.storage),
                TableSpec(f"r_{f.name}", int(c), half, self.storage),
            ]
            concat = self.op == "concat"
            lookups += [
                Lookup(f"{f.name}_q", f"q_{f.name}", field=i),
                Lookup(
                    f"{f.name}_r",
                    f"r_{f.name}",
                    field=i,
                    start=half if concat else 0,
                    term=0 if concat else 1,
                ),
            ]
            # Fingerprint keys: hash into the ⌈n/m⌉·m pairs the tables hold, then split.
            space = -(-f.cardinality // int(c)) * int(c) if self.keys == "fingerprint" else 0
            salt = stable_salt(SALT_TAG + f.name) if space else 0
            rules += [
                QRRule(i, int(c), space=space, salt=salt),
                QRRule(i, int(c), remainder=True, space=space, salt=salt),
            ]
        return TableLayout(
            tables=tables,
            lookups=lookups,
            op=OPS[self.op],
            index_map=QuotientRemainderMap(self.feature_names, [lk.key for lk in lookups], rules),
        )

    def _bytes(self, sizes: np.ndarray, keep: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Layout bytes for collisions ``m`` (per field, or a grid ``[M, 1]``); ``m <= 1``
        means full. A field is compressed only where QR is smaller than its full table."""
        full = sizes * row_bytes(self.dim, self.storage)
        qr = qr_rows(sizes, m) * row_bytes(self._qr_dim, self.storage)
        return np.where(keep | (m <= 1), full, np.minimum(full, qr)).sum(-1)

    def _solve_collisions(self, sizes: np.ndarray, keep: np.ndarray) -> np.ndarray | None:
        """Per-field collisions for the smallest shared ``m`` that fits (1 = full), or None."""
        if self._bytes(sizes, keep, np.ones_like(sizes)) <= self.budget_bytes:
            return np.ones_like(sizes)
        best = np.ceil(np.sqrt(sizes)).astype(np.int64)
        grid = np.arange(2, int(best.max()) + 1, dtype=np.int64)[:, None]  # [M, 1]
        m = np.minimum(grid, best[None, :])  # each field's m, capped at its optimum
        fits = np.flatnonzero(self._bytes(sizes, keep, m) <= self.budget_bytes)
        if not len(fits):
            return None
        chosen = m[fits[0]].copy()
        # One m for all fields leaves budget unused (m - 1 did not fit everywhere): give
        # m - 1 to the largest fields while the layout still fits.
        for i in np.argsort(-sizes, kind="stable"):
            trial = chosen.copy()
            trial[i] -= 1
            if (
                trial[i] >= 2
                and not keep[i]
                and self._bytes(sizes, keep, trial) <= self.budget_bytes
            ):
                chosen = trial
        full = sizes * row_bytes(self.dim, self.storage)
        qr = qr_rows(sizes, chosen) * row_bytes(self._qr_dim, self.storage)
        return np.where(keep | (qr >= full), 1, chosen)

    def hyperparameters(self) -> dict[str, Any]:
        shared = max(self.collisions.values(), default=1)
        return {
            **super().hyperparameters(),
            "op": self.op,
            "threshold": self.threshold,
            "keys": self.keys,
            "collisions": shared,
            "collisions_per_field": self.collisions,
            "full_fields": [n for n in self.feature_names if n not in self.collisions],
        }
