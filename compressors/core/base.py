"""The compressor contract every method implements (see docs/design.md, "The compressor contract").

A compressor is an ``nn.Module`` built from the feature specs, the model's ``dim`` and a budget
in bytes. It solves its own hyperparameters so that its serving footprint fits the budget,
maps a ``KeyedJaggedTensor`` of field ids to ``[B, F, dim]``, reports exact memory, lists its
training stages, and exports a serving representation that holds no pickled code.

The contract, in short:

- ``solve(features, dim, budget_bytes, options) -> Plan`` (classmethod; JSON, exact bytes, no
  weights allocated) and ``plan()``/``check_plan()`` on a built method;
- ``forward(kjt) -> [B, F, dim]``, ``penalty()``, ``memory() -> MemoryReport``,
  ``export() -> ExportedEmbedding``, ``set_storage(dtype)``, ``hyperparameters()``;
- ``stages`` of :class:`Stage` (trains, epochs, bilevel, dense, rewind, rebuilds) and hooks
  ``on_stage_start``, ``run_stage``, ``after_step``, ``on_stage_end`` receiving a
  :class:`StageContext`; ``optimizer_groups()`` (role ``train``/``valid``), ``rewind_keep()``,
  ``rewind_state()``, ``architecture()``/``rebuild()``;
- options: the constructor's keyword arguments, help in ``option_help``.

Adding a method: one module and ``@register`` (see ``compressors/__init__.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.budget import BudgetError, describe_bytes

FLOAT_BYTES = 4


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse field as the embedding layer sees it.

    ``cardinality`` counts every id including the OOV id 0. ``frequencies`` (train counts per
    id, optional) lets frequency-aware methods split head from tail. ``fingerprints``
    (optional, int64 per id, id 0 -> 0) are the 64-bit fingerprints of the raw values
    (:mod:`datasets.fingerprint`): a layer with ``keys="fingerprint"`` feeds them to methods
    that hash values, so serving can hash raw values without a vocabulary.
    """

    name: str
    cardinality: int
    multi_hot: bool = False
    frequencies: np.ndarray | None = field(default=None, compare=False, repr=False)
    fingerprints: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.cardinality < 1:
            raise ValueError(f"feature {self.name!r}: cardinality must be >= 1")
        if self.frequencies is not None and len(self.frequencies) != self.cardinality:
            raise ValueError(
                f"feature {self.name!r}: {len(self.frequencies)} frequencies for "
                f"cardinality {self.cardinality}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "cardinality": self.cardinality, "multi_hot": self.multi_hot}


def full_bytes(features: Sequence[FeatureSpec], dim: int) -> int:
    """Bytes of the uncompressed fp32 tables: ``sum(cardinality) * dim * 4``."""
    return sum(f.cardinality for f in features) * dim * FLOAT_BYTES


@dataclass
class MemoryReport:
    """Embedding memory of a built method.

    ``serve_bytes`` equals the bytes of the embedding tensors its artifact holds;
    ``train_bytes`` is the peak of embedding parameters plus optimizer state while training.
    ``parts`` breaks ``serve_bytes`` down by component.
    """

    serve_bytes: int
    train_bytes: int
    full_bytes: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Compression ratio: full fp32 bytes over serving bytes."""
        return self.full_bytes / max(self.serve_bytes, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "serve_bytes": self.serve_bytes,
            "train_bytes": self.train_bytes,
            "full_bytes": self.full_bytes,
            "ratio": self.ratio,
            "parts": dict(self.parts),
        }


@dataclass
class Plan:
    """What a method's solver decided for a budget, and its exact bytes: small and JSON-able.

    ``solve()`` returns it without building the method (no weights allocated); a run records
    it, and building from it (:func:`compressors.build_from_plan`) gives exactly this method.
    ``details`` holds what the method's solver chose: for table methods ``{"layout": ...}``
    (tables with rows/dim/dtype, lookups, the index map's config, the combine op).
    """

    method: str
    dim: int
    budget_bytes: int
    options: dict[str, Any]
    serve_bytes: int
    train_bytes: int
    full_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.full_bytes / max(self.serve_bytes, 1)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Plan:
        return cls(**raw)


_PLANNING: contextvars.ContextVar[bool] = contextvars.ContextVar("planning", default=False)


@contextlib.contextmanager
def planning() -> Iterator[None]:
    """Within it, constructors only solve: weights live on PyTorch's meta device (shapes
    without storage), so building costs the solver's arithmetic, not the tables' memory."""
    token = _PLANNING.set(True)
    try:
        yield
    finally:
        _PLANNING.reset(token)


def is_planning() -> bool:
    return _PLANNING.get()


@dataclass(frozen=True)
class PlanContext:
    """Plan inputs that are a run's training choices rather than the method's options: the
    optimizer of the physical tables and of embedding modules (TT cores, ROBE's array, DHE's
    network: their own Adam, or the tables' family under the fair protocol). They set the
    plan's ``train_bytes`` (optimizer state) and are not recorded among its options.

    A method reads them once, as it is built (:func:`plan_context` around
    :func:`~compressors.core.registry.solve` or ``build_compressor``, or their ``context``
    argument). Outside a run the defaults hold: fbgemm's rowwise Adagrad and Adam; a run
    resolves its ``"auto"`` optimizer to the method's :attr:`~Compressor.default_optimizer`
    and passes it here."""

    table_optimizer: str = "rowwise_adagrad"
    module_optimizer: str = "adam"


_DEFAULT_CONTEXT = PlanContext()
_PLAN_CONTEXT: contextvars.ContextVar[PlanContext | None] = contextvars.ContextVar(
    "plan_context", default=None
)


@contextlib.contextmanager
def plan_context(context: PlanContext | None) -> Iterator[PlanContext]:
    """Within it, methods are solved and built for ``context`` (None: the defaults)."""
    token = _PLAN_CONTEXT.set(context or _DEFAULT_CONTEXT)
    try:
        yield current_plan_context()
    finally:
        _PLAN_CONTEXT.reset(token)


def current_plan_context() -> PlanContext:
    return _PLAN_CONTEXT.get() or _DEFAULT_CONTEXT


class SearchedBytes:
    """Mixin of methods whose exact serving bytes a training stage decides (OptEmbed's search,
    PEP's and DeepLight's pruning, DNIS's prune): their plan bounds them by the budget.

    Subclasses implement :meth:`solve_budget` (pure arithmetic: ``{"feasible",
    "floor_bytes", "train_bytes", ...}``) and refuse an infeasible budget in their constructor
    with their own message. The plan's ``serve_bytes`` is then the budget the method
    guarantees never to exceed (``details["bound"]`` is True), while ``memory()`` reports the
    bytes of the current masks (the exact figure once the deciding stage has run). A method
    that has no bytes to report before that stage (DNIS's prune, AutoDim's choice) reports
    :meth:`bound_memory`: the budget, labelled as the bound.

    :meth:`plan_context` passes what the plan's arithmetic reads from the built method rather
    than from its options (the table optimizer the trainer set, for ``train_bytes``); it is
    not recorded among the plan's options.
    """

    searched: ClassVar[bool] = True
    # Plan details that follow the export format rather than the trained model (see
    # Compressor.check_plan): they may change between versions without making a run stale.
    format_details: ClassVar[tuple[str, ...]] = ("floor_bytes",)

    @classmethod
    def solve_budget(
        cls, features: Sequence[FeatureSpec], dim: int, budget_bytes: int, **options: Any
    ) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def solve(
        cls, features: Sequence[FeatureSpec], dim: int, budget_bytes: int, options: dict[str, Any]
    ) -> Plan:
        context: dict[str, Any] = {}
        if cls.plan_context is not SearchedBytes.plan_context:
            # What the built method's plan_context() will read: the run's table optimizer.
            context["table_optimizer"] = current_plan_context().table_optimizer
        return cls.bound_plan(features, dim, budget_bytes, options, context)

    @classmethod
    def bound_plan(
        cls,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        options: dict[str, Any],
        context: dict[str, Any],
    ) -> Plan:
        """The plan for ``options``; ``context`` (see :meth:`plan_context`) is passed to
        :meth:`solve_budget` but not recorded."""
        raw = cls.solve_budget(features, dim, budget_bytes, **{**options, **context})
        if not raw["feasible"]:
            # The constructor refuses with the method's own message; build it weightless.
            with planning(), torch.device("meta"):
                cls(features, dim, budget_bytes, **options)  # type: ignore[call-arg]
            raise BudgetError(
                f"{cls.name}: needs at least {describe_bytes(raw['floor_bytes'])}, the budget "  # type: ignore[attr-defined]
                f"is {describe_bytes(budget_bytes)}"
            )
        return Plan(
            method=cls.name,  # type: ignore[attr-defined]
            dim=dim,
            budget_bytes=budget_bytes,
            options=dict(options),
            serve_bytes=budget_bytes,
            train_bytes=int(raw["train_bytes"]),
            full_bytes=full_bytes(features, dim),
            details={"bound": True, **raw},
        )

    def plan(self) -> Plan:
        return type(self).bound_plan(
            self.features,  # type: ignore[attr-defined]
            self.dim,  # type: ignore[attr-defined]
            self.budget_bytes,  # type: ignore[attr-defined]
            self.options,  # type: ignore[attr-defined]
            self.plan_context(),
        )

    def plan_context(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`solve_budget` read from the built method (not options)."""
        return {}

    def bound_memory(self, train_bytes: int, stage: str) -> MemoryReport:
        """``memory()`` before the deciding ``stage`` has run: the budget as the bound it keeps
        (the exact bytes depend on what that stage learns)."""
        budget = self.budget_bytes  # type: ignore[attr-defined]
        return MemoryReport(
            serve_bytes=budget,
            train_bytes=train_bytes,
            full_bytes=self.full_bytes,  # type: ignore[attr-defined]
            parts={f"bound: at most the budget ({stage} decides)": budget},
        )


@dataclass
class ExportedEmbedding:
    """A serving representation: a JSON-able ``config`` plus named tensors.

    ``kind`` names the serving module that :func:`compressors.build_serving` rebuilds from it;
    ``tensors`` are exactly the embedding bytes the artifact stores.
    """

    kind: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class Stage:
    """One step of a method's training procedure, and what the trainer does around it.

    - ``trains``: the trainer runs gradient steps (epochs, evaluation); otherwise the
      compressor's ``run_stage`` does the work (a search, a quantisation pass), checkpointing
      its progress through ``ctx.checkpoint``.
    - ``epochs``: overrides the run's epoch count for this stage.
    - ``early_stop``: the stage ends when validation AUC has not improved for the run's
      patience, and the embedding learning rates decay on plateaus (``lr_decay``). False runs
      the stage's schedule to its last step (searches and pruning schedules: a dip in
      validation AUC is what pruning does on its way to the target, not a reason to stop).
    - ``restore_best``: at the end of the stage the weights of its best evaluation come back
      (the run's ``restore_best`` permitting). Never the compressor's
      ``architecture_state()`` (masks, thresholds, α, searched choices): the trainer does not
      roll an architecture back; a stage whose weights only make sense with the architecture
      it ends with (a pruning schedule) sets False.
    - ``bilevel``: steps alternate one training batch (dense Adam, fused tables and groups
      tagged ``"train"``) with one validation batch (only groups tagged ``"valid"``: DNIS's α,
      AutoDim's weights). Both use ``ctx.loss`` plus ``penalty()``.
    - ``dense``: False freezes the dense network in this stage (its Adam does not step).
    - ``rewind``: when the stage first starts, every weight is reset to the run's initial
      weights (saved at step 0), except the compressor's ``rewind_keep()`` entries (masks,
      thresholds), and optimizer states are reset: lottery-ticket retraining (PEP, OptEmbed).
    - ``rebuilds``: the compressor changes shapes in ``on_stage_end`` (after the stage's last
      ``ctx.checkpoint``, so a resumed stage finds the old shapes); the trainer then re-fuses
      tables and rebuilds optimizers, and records ``architecture()`` in checkpoints and
      ``model.pt`` so loading calls ``rebuild(record)`` before reading the weights. A later
      rewinding stage maps the step-0 weights onto the new shapes with ``rewind_state()``.
    """

    name: str
    trains: bool = True
    epochs: float | None = None
    bilevel: bool = False
    dense: bool = True
    rewind: bool = False
    rebuilds: bool = False
    early_stop: bool = True
    restore_best: bool = True


#: The flags of a stage that searches or prunes: its schedule runs to the end and its
#: weights are never restored from an earlier evaluation.
SCHEDULED = {"early_stop": False, "restore_best": False}


class Progress(Protocol):
    """A progress bar (tqdm's interface)."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...


class StageContext(Protocol):
    """What a compressor's stage hooks see of the training run (the trainer implements it).

    Compressors import nothing from ``ctr``: everything they need of the run is here.
    """

    stage: Stage
    #: the stage is continuing from a checkpoint (``on_stage_start`` runs again on resume)
    resumed: bool
    #: the run's seed
    seed: int
    #: the current learning rate of embedding parameters: the run's table lr times its
    #: plateau decay (what a method stepping its own rows must use)
    table_lr: float
    #: the run's decoupled embedding L2 (rows a method steps itself get it through
    #: ``set_weight_decay`` of their table; read it for anything else)
    embedding_l2: float
    #: the batch of the training step just taken (in ``after_step``)
    batch: Any

    @property
    def model(self) -> nn.Module:
        """The whole CTR model as trained (``model(dense, sparse) -> logits``)."""
        ...

    @property
    def step(self) -> int:
        """Optimizer steps taken so far in the run (all stages)."""
        ...

    @property
    def stage_step(self) -> int:
        """Optimizer steps taken so far in this stage (counted like :attr:`step`: in
        ``after_step`` the step just taken is not yet counted)."""
        ...

    @property
    def stage_steps(self) -> int:
        """The steps this training stage is scheduled for (its epochs × batches per epoch):
        the length a method's schedule (pruning, annealing) is defined over. A stage that
        early-stops may end before it."""
        ...

    def loss(self, batch: Any) -> torch.Tensor:
        """The run's data loss (mean BCE) of ``batch``, with gradients; no ``penalty()``."""
        ...

    def train_batches(self) -> Iterator[Any]:
        """Endless shuffled training batches, seeded by the run and stage."""
        ...

    def valid_batches(self) -> Iterator[Any]:
        """Endless shuffled validation batches of the training batch size (a bilevel
        stage's architecture steps draw theirs from the same stream)."""
        ...

    def evaluate(self, split: str = "valid", max_batches: int | None = None) -> dict[str, float]:
        """``{"auc", "logloss"}`` of the model (eval mode) on ``split``'s first batches."""
        ...

    def progress(self, total: int, desc: str) -> Progress:
        """A progress bar shown only where the run shows one."""
        ...

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Saves a non-training stage's progress with the model, atomically; ``state`` holds
        tensors, numbers, strings, lists and dicts. A resumed stage reads it back from
        :meth:`restored_state`."""
        ...

    def restored_state(self) -> dict[str, Any] | None:
        """What this stage last passed to :meth:`checkpoint`, when resuming; else None."""
        ...

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` at step 0 (a rewind's target), read from the run; the
        compressor's ``rewind_keep()`` entries may be absent (a rewind reads them live)."""
        ...

    def rng(self) -> torch.Generator:
        """A generator seeded by the run's seed and the stage (reproducible searches)."""
        ...

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along the first dimension (``t`` itself in one
        process): a procedure scoring on ``valid_batches`` (each rank's share of every
        batch) pools its scores this way so that every rank decides on the whole batches."""
        ...


def _flat(plan: dict[str, Any]) -> dict[str, Any]:
    """A plan's JSON with its ``details`` (and other dicts) flattened one level, as
    ``details.floor_bytes``, so a mismatch names the very entry."""
    out: dict[str, Any] = {}
    for k, v in plan.items():
        if isinstance(v, dict) and k != "parts":
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


class Compressor(nn.Module):
    """Base class of every method. Subclasses set ``name`` and implement the abstract parts.

    Example::

        layer = build_compressor("full", features, dim=16, budget="1x")
        emb = layer(kjt)                # [B, F, 16]
        layer.memory().serve_bytes
    """

    name: ClassVar[str] = ""
    #: True for methods whose serving bytes a stage decides (see :class:`SearchedBytes`).
    searched: ClassVar[bool] = False
    format_details: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[tuple[Stage, ...]] = (Stage("train"),)
    #: The optimiser of the method's embedding rows when a run does not choose one (``ctr
    #: train --table-optimizer auto``): fbgemm's fused row-wise Adagrad (the fast path, and
    #: what DMP shards), or the paper's optimiser where the method needs it (Adam for the
    #: pruning family and DNIS, whose magnitude criteria and α assume it). Sweeps choose it
    #: explicitly (the protocol's optimiser axis).
    default_optimizer: ClassVar[str] = "rowwise_adagrad"
    #: True when the method trains data-parallel under ``torchrun``: its own row tables
    #: average their gradients over the ranks (:mod:`compressors.core.collective`), its
    #: procedures decide from replicated state and data pooled with ``StageContext.gather``,
    #: so every rank holds what one process would. Such a method's stages (searches,
    #: evolutions, bilevel and rebuilding stages) run on every rank; its TorchRec tables are
    #: still sharded unless its table optimizer has no fused kernel (then replicated).
    data_parallel: ClassVar[bool] = False
    #: True when some parameters learn on validation batches (a bilevel search, as DARTS-style
    #: papers do): the validation split is then training data too, which reports flag.
    learns_on_validation: ClassVar[bool] = False
    #: Share of the training split a bilevel stage's architecture steps draw from instead of
    #: the validation split; no stage trains on those rows (see :meth:`hold_out`).
    search_holdout: float = 0.0
    #: help text of the constructor's options (merged along the class hierarchy)
    option_help: ClassVar[dict[str, str]] = {
        "init_scale": "bound of the uniform initialisation of table rows",
        "threshold": "fields of at most this many values keep collisionless rows",
        "seed": "seed of the hash functions' salts",
        "table_share": "at most this share of the budget goes to small fields' plain tables",
        "lr": "Adam learning rate of the method's own parameters (None: the trainer's)",
        "optimizer": "optimizer of the integer rows: sgd, adagrad or rowwise_adagrad",
        "search_holdout": "share of the training split the search's architecture steps use "
        "instead of the validation split, never trained on (0: the validation split, as the "
        "paper)",
    }

    def __init__(self, features: Sequence[FeatureSpec], dim: int, budget_bytes: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if not features:
            raise ValueError("at least one feature is needed")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names in {names}")
        self.features = list(features)
        self.dim = dim
        self.budget_bytes = budget_bytes
        self.full_bytes = full_bytes(features, dim)
        # Plan inputs from the run (train_bytes counts their state), read once as the method
        # is built: see PlanContext.
        context = current_plan_context()
        self.table_optimizer = context.table_optimizer
        self.module_optimizer = context.module_optimizer
        # The options it was built with (the registry sets them; plans record them).
        self.options: dict[str, Any] = {}

    # ---------------------------------------------------------------- solving
    @classmethod
    def solve(
        cls,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        options: dict[str, Any],
    ) -> Plan:
        """The plan this method builds for the budget, without allocating its weights.

        Raises :class:`~compressors.core.budget.BudgetError` when the budget cannot be met.
        The default runs the constructor on PyTorch's meta device (every tensor a shape
        without storage); a base whose solver reads tensor values overrides this
        (:class:`~compressors.core.tables.TableMethod` solves its layout in plain Python).
        """
        with planning(), torch.device("meta"):
            method = cls(features, dim, budget_bytes, **options)
        method.options = dict(options)
        return method.plan()

    def plan(self) -> Plan:
        """This built method's plan (what :meth:`solve` returns for its arguments)."""
        memory = self.memory()
        return Plan(
            method=self.name,
            dim=self.dim,
            budget_bytes=self.budget_bytes,
            options=dict(self.options),
            serve_bytes=memory.serve_bytes,
            train_bytes=memory.train_bytes,
            full_bytes=memory.full_bytes,
            parts=dict(memory.parts),
            details=self.plan_details(),
        )

    def plan_details(self) -> dict[str, Any]:
        """What the solver chose, as JSON (the plan's ``details``); bases extend it."""
        return {}

    def check_plan(self, plan: Plan) -> None:
        """Raises ValueError unless this method is exactly what ``plan`` describes (a plan
        recorded by an older version whose solver has changed since, for instance)."""
        # Through JSON, as a recorded plan went (tuples become lists).
        mine = _flat(json.loads(json.dumps(self.plan().to_json())))
        theirs = _flat(json.loads(json.dumps(plan.to_json())))
        if theirs.get("details.bound"):
            # A searched method's floor (and what its budget buys) is arithmetic of its export
            # format (a newer, smaller remap changes it), not of the model a run trained: a
            # finished run stays loadable; its export is sized by today's format.
            for key in self.format_details:
                mine.pop(f"details.{key}", None)
                theirs.pop(f"details.{key}", None)
        differ = [k for k in theirs if not k.startswith("options") and mine.get(k) != theirs[k]]
        if differ:
            what = "; ".join(
                f"{k}: {theirs[k]!r} recorded, {mine.get(k)!r} now" for k in differ[:3]
            )
            raise ValueError(
                f"{self.name}: the recorded plan no longer matches what this version builds "
                f"from the same options ({what})"
            )

    def set_storage(self, dtype: str) -> None:
        """Serves the trained tables at ``dtype`` (fp32/fp16/int8/int4/int2), same layout."""
        # The methods that can: every named subclass that overrides this (no registry needed).
        able = sorted(
            {c.name for c in _subclasses(Compressor) if c.set_storage is not Compressor.set_storage}
            - {""}
        )
        raise ValueError(
            f"{self.name}: its serving format is fixed by the method (--storage {dtype} "
            "refused); --storage applies to "
            f"{', '.join(able)} (for hybrid methods, to their plain tables)"
        )

    def hold_out(self, share: float) -> None:
        """Sets :attr:`search_holdout` (option ``search_holdout``) after checking it."""
        if not 0.0 <= share < 1.0:
            raise ValueError(f"{self.name}: search_holdout must lie in [0, 1), got {share}")
        self.search_holdout = float(share)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def num_features(self) -> int:
        return len(self.features)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:  # [B, F, dim]
        raise NotImplementedError

    def penalty(self) -> torch.Tensor:
        """Extra loss terms (regularisers of thresholds, architecture weights, ...)."""
        return torch.zeros(())

    def memory(self) -> MemoryReport:
        raise NotImplementedError

    def export(self) -> ExportedEmbedding:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """What the budget solver chose, for run summaries and manifests."""
        return {}

    def hashed_fields(self) -> list[str]:
        """Fields whose embedding depends on a value only through a 64-bit hash of it, so any
        int64 key (a raw value's fingerprint) can stand in for its id. None by default."""
        return []

    # Training hooks; the trainer calls them in this order. Defaults do nothing.
    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        """Called before a stage runs (e.g. freeze masks, switch modes)."""

    def run_stage(self, stage: Stage, ctx: StageContext) -> None:
        """Does the work of a stage with ``trains=False``."""
        raise NotImplementedError(f"{self.name}: stage {stage.name!r} has no implementation")

    def after_step(self, ctx: StageContext) -> None:
        """Called after every optimizer step of a training stage."""

    def on_stage_end(self, stage: Stage, ctx: StageContext) -> None:
        """Called after a stage finished (e.g. prune, fix a mask, quantise)."""

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups needing their own optimizer: ``{"params", "optimizer", "lr"}``,
        optionally ``"role"`` (``"train"``, the default, or ``"valid"``: stepped only on the
        validation batches of a bilevel stage), ``"weight_decay"`` and ``"embedding"`` (True:
        the group holds embedding parameters — it gets the run's embedding L2 and plateau
        decay, and the tables' optimizer under the fair-comparison protocol; thresholds and
        architecture weights leave it unset). ``optimizer`` is ``"adam"``, ``"sgd"``,
        ``"adagrad"`` or ``"rowwise_adagrad"``; ``lr`` None means the trainer's dense lr.

        Everything not listed here (and not a fused table) goes to the trainer's dense Adam.
        """
        return []

    def rewind_keep(self) -> list[str]:
        """State-dict names (relative to this module, prefixes allowed) that a rewinding stage
        keeps instead of resetting to the initial weights: masks, thresholds, searched dims."""
        return []

    def architecture_state(self) -> list[str]:
        """State-dict names (relative to this module, prefixes allowed) of the architecture:
        what a stage decides rather than trains as weights (masks, thresholds, α, searched
        dims). Restoring a stage's best weights never rolls them back. Default: the
        entries a rewind keeps."""
        return self.rewind_keep()

    def rewind_state(self, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This module's step-0 weights (names relative to it) fitted to its current shapes,
        for a rewind after a rebuild (e.g. OptEmbed's retrain at the searched dims slices the
        initial rows and columns it kept). Default: unchanged."""
        return initial

    def architecture(self) -> dict[str, Any] | None:
        """After a ``rebuilds`` stage: a JSON record of the changed shapes (None: unchanged)."""
        return None

    def rebuild(self, architecture: dict[str, Any]) -> None:
        """Reshapes a freshly built method to ``architecture`` (before its weights load)."""
        raise NotImplementedError(f"{self.name}: cannot rebuild from an architecture record")

    def check_budget(self, serve_bytes: int, what: str = "") -> None:
        """Raises a clear error when the solved configuration exceeds the budget."""
        from compressors.core.budget import BudgetError, describe_bytes

        if serve_bytes > self.budget_bytes:
            raise BudgetError(
                f"{self.name}: {what or 'the configuration'} needs {describe_bytes(serve_bytes)} "
                f"but the budget is {describe_bytes(self.budget_bytes)} "
                f"({self.full_bytes / self.budget_bytes:.1f}x of {describe_bytes(self.full_bytes)})"
            )


def _subclasses(cls: type) -> Iterator[type]:
    """Every subclass of ``cls``, at any depth."""
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)
