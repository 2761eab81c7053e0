"""The exact byte arithmetic of pruned tables, and :class:`FieldPlan`, how one field is served.

Each field is stored in the cheapest form its pattern allows, and every byte is counted:

- ``dense``: all ``n_f`` rows at the field's dim ``d_f`` (no index bytes);
- ``rows``: only the kept rows at ``d_f`` plus a remap ``id -> kept row`` in the smaller of
  two exactly counted forms (:mod:`compressors.pruning.remap`): an array (int16 when the
  stored rows fit, else int32: 16-32 bits an id) or a rank bitmap (2.5 bits an id). With a
  per-field OOV vector (``FieldPlan.oov``) the field stores one more row, the vector, and its
  pruned ids read it;
- ``csr`` (entry-sparse tables): values + column indices per non-zero entry and the row
  pointers (:mod:`compressors.core.csr`); values at fp32, fp16 or int8 (int8: symmetric codes
  with one fp32 scale per field, ``max|v| / 127``);
- ``empty``: every row pruned (and no OOV vector): zero bytes, reads zeros.

Example::

    plan = [FieldPlan("C1", 1000, "rows", dim=8, kept=120), FieldPlan("C2", 40, "dense", dim=16)]
    sum(p.serve_bytes("int8") for p in plan)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from compressors.core.base import FeatureSpec
from compressors.core.csr import column_bytes, pointer_bytes
from compressors.core.storage import BITS, row_bytes

INT16_MAX = 32767
INT8_MAX = 127
FORMS = ("dense", "rows", "csr", "empty")
CSR_DTYPES = ("fp32", "fp16", "int8")
CSR_SCALE_BYTES = 4  # the fp32 scale of a field's int8 CSR values
RANK_BLOCK = 64  # ids per entry of a rank bitmap's directory
RANK_BLOCK_BYTES = 2 * (RANK_BLOCK // 8) + 4  # the block's bits, byte counts, int32 count


def remap_bytes(rows: int, kept: int) -> int:
    """Bytes of an array remap of ``rows`` ids onto ``kept`` rows (int16 when it fits, else
    int32)."""
    return rows * (2 if kept <= INT16_MAX else 4)


def bitmap_bytes(rows: int) -> int:
    """Bytes of a rank bitmap over ``rows`` ids: the bits, a uint8 count per 8 ids and an
    int32 count per 64."""
    return -(-rows // RANK_BLOCK) * RANK_BLOCK_BYTES


def remap_form(rows: int, stored: int) -> str:
    """The smaller remap of ``rows`` ids onto ``stored`` rows: ``array`` or ``bitmap``."""
    return "bitmap" if bitmap_bytes(rows) < remap_bytes(rows, stored) else "array"


def index_bytes(rows: int, stored: int) -> int:
    """Bytes of the remap a ``rows`` field with ``stored`` table rows is served with."""
    return min(remap_bytes(rows, stored), bitmap_bytes(rows))


def csr_fixed_bytes(rows: int, dim: int, dtype: str) -> int:
    """The bytes of a CSR field that do not grow with its entries: its row pointers, and the
    field's scale when the values are int8."""
    return pointer_bytes(rows, dim) + (CSR_SCALE_BYTES if dtype == "int8" else 0)


def csr_entry_bytes(dim: int, dtype: str) -> int:
    """Bytes of one CSR entry: its value and its column index."""
    if dtype not in CSR_DTYPES:
        raise ValueError(f"no CSR form at {dtype} storage (CSR values are {list(CSR_DTYPES)})")
    return BITS[dtype] // 8 + column_bytes(dim)


def csr_bytes(rows: int, nnz: int, dim: int, dtype: str) -> int:
    """CSR of ``nnz`` entries: values + column indices, row pointers (and an int8 scale)."""
    return nnz * csr_entry_bytes(dim, dtype) + csr_fixed_bytes(rows, dim, dtype)


def min_dim(dtype: str) -> int:
    """The smallest dim whose rows fbgemm packs at ``dtype`` (even bytes for int-N rows)."""
    return {"fp32": 1, "fp16": 1, "int8": 2, "int4": 4, "int2": 8}[dtype]


def dim_choices(dim: int, dtype: str) -> list[int]:
    """Dims a field may be cut to at ``dtype`` (multiples of :func:`min_dim`, up to ``dim``)."""
    step = min_dim(dtype)
    choices = list(range(step, dim + 1, step))
    if not choices:
        raise ValueError(f"{dtype} storage needs dim >= {step}, got {dim}")
    return choices


@dataclass(frozen=True)
class FieldPlan:
    """How one field is served: ``form`` (see module docstring), dim, kept rows, entries, and
    whether its pruned ids read a stored OOV row (``oov``, ``rows`` form only)."""

    name: str
    rows: int
    form: str
    dim: int
    kept: int = 0
    nnz: int = 0
    oov: bool = False

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"field {self.name!r}: unknown form {self.form!r}")
        if self.oov and self.form != "rows":
            raise ValueError(f"field {self.name!r}: only the rows form stores an OOV row")

    @property
    def stored_rows(self) -> int:
        """Rows of the field's fbgemm table (kept rows, plus the OOV row)."""
        return self.rows if self.form == "dense" else self.kept + int(self.oov)

    def serve_bytes(self, dtype: str) -> int:
        if self.form == "dense":
            return self.rows * row_bytes(self.dim, dtype)
        if self.form == "rows":
            stored = self.stored_rows
            return stored * row_bytes(self.dim, dtype) + index_bytes(self.rows, stored)
        if self.form == "csr":
            return csr_bytes(self.rows, self.nnz, self.dim, dtype)
        return 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def row_plan(name: str, rows: int, kept: int, dim: int, oov: bool = False) -> FieldPlan:
    """The form of a row-pruned field: ``dense`` when nothing is pruned, ``empty`` when all
    (without an OOV vector), else ``rows`` (plus the OOV row when ``oov``)."""
    if kept >= rows:
        return FieldPlan(name, rows, "dense", dim, kept=rows)
    if kept == 0 and not oov:
        return FieldPlan(name, rows, "empty", dim)
    return FieldPlan(name, rows, "rows", dim, kept=kept, oov=oov)


def cheapest_entry_plan(
    name: str, rows: int, kept_rows: int, nnz: int, dim: int, dtype: str
) -> FieldPlan:
    """The cheapest honest form of an entry-sparse field (``kept_rows`` rows hold ``nnz``)."""
    options = [row_plan(name, rows, kept_rows, dim)]
    if dtype in CSR_DTYPES and 0 < nnz:
        options.append(FieldPlan(name, rows, "csr", dim, kept=kept_rows, nnz=nnz))
    return min(options, key=lambda p: p.serve_bytes(dtype))


def max_csr_entries(features: Sequence[FeatureSpec], dim: int, budget: int, dtype: str) -> int:
    """The most non-zero entries whose CSR export fits ``budget`` (a bound every cheaper
    per-field form then meets too)."""
    fixed = sum(csr_fixed_bytes(f.cardinality, dim, dtype) for f in features)
    return (budget - fixed) // csr_entry_bytes(dim, dtype)
