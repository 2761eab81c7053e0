"""A finished run's results (``RUN/summary.json``): one typed record, one spelling of its keys.

Example::

    summary = RunSummary.from_json(json.loads((run_dir / "summary.json").read_text()))
    summary.test_auc, RunSummary.keys()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RunSummary:
    """What a finished run reports; ``summary.json`` holds :meth:`to_json` (keys in this
    order). Bytes are the method's exact figures (``train_bytes`` includes lazy embedding
    L2's state, split in ``train_parts``); ``budget_bytes`` is the budget as parsed once by
    the method; ``teacher_test_auc`` is the synthetic data's generating model's (None for
    real data)."""

    model: str
    compressor: str
    budget: str | int | float
    dim: int
    test_auc: float
    test_logloss: float
    valid_auc: float
    valid_logloss: float
    serve_bytes: int
    train_bytes: int
    train_parts: dict[str, int]
    full_bytes: int
    budget_bytes: int
    ratio: float
    memory_parts: dict[str, int]
    hyperparameters: dict[str, Any]
    samples_per_sec: float
    steps: int
    train_seconds: float
    stage_seconds: dict[str, float]
    batch_size: int
    world_size: int
    teacher_test_auc: float | None
    wall_seconds: float
    finished: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys of ``summary.json``, in order (``extra``'s entries follow them)."""
        return tuple(f.name for f in fields(cls) if f.name != "extra")

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        return {**{k: raw[k] for k in self.keys()}, **raw["extra"]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunSummary:
        """Reads a ``summary.json``; keys this version does not know land in ``extra``, keys
        it needs and lacks raise ValueError naming them."""
        known = set(cls.keys())
        defaults = {"finished"}
        missing = [k for k in cls.keys() if k not in raw and k not in defaults]
        if missing:
            raise ValueError(f"summary: missing {', '.join(missing)}")
        return cls(
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )
