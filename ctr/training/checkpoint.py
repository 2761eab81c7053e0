"""A run's files on disk: weights, the checkpoint, and where the run stands.

The run directory receives ``config.json`` (written by the caller), ``metrics.jsonl`` (one
line per evaluation), ``checkpoint.pt`` (everything needed to continue exactly),
``best.pt`` (best validation weights), ``model.pt`` (final weights, what ``ctr export``
reads) and, when a stage rewinds, ``initial.pt`` (the weights at step 0). Every file is
written beside and renamed into place (:func:`datasets.io.atomic_write`); all ``.pt`` files
load with ``torch.load(weights_only=True)`` and hold whole (unsharded) tensors, so a DMP
run's files read like a single process's. After a stage that changes shapes, ``model.pt``
and the checkpoint carry the compressor's architecture record under
:data:`ARCHITECTURE_KEY`.

Example::

    files = RunFiles(run_dir, main=True)
    files.save_weights("best.pt", state, architecture=None)
    payload = files.read_checkpoint(world_size=1)   # None when the run starts afresh
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compressors.core.spill import copy_rows, mapped_ranges, release_mapped
from ctr.training.placement import embedding_rows, table_modules
from datasets.io import atomic_write

if TYPE_CHECKING:
    from compressors.core.base import Compressor
    from ctr.training.config import TrainConfig
    from ctr.training.placement import Placement

ARCHITECTURE_KEY = "__architecture__"


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    stage: int = 0
    stage_started: bool = False
    epoch: int = 0
    batch: int = 0
    stage_step: int = 0
    step: int = 0
    best_auc: float = -math.inf
    bad_evals: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    lr_scale: float = 1.0
    finished: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    architecture: dict[str, Any] | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_weights(path: Path, what: str, mmap: bool = False) -> Any:
    """``torch.load`` (no pickle) with a one-line error naming the file when it is damaged.
    ``mmap`` maps the tensors from the file instead of reading them into memory: weights
    that are only copied into a model's own (restored) need no second copy of every table."""
    try:
        # On the host: a run trained on CUDA loads, exports and resumes anywhere.
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(
            f"{path}: unreadable {what} file ({reason}); it is truncated or corrupt — "
            "delete it to start this run afresh"
        ) from e


def save(obj: Any, path: Path) -> None:
    """``torch.save`` beside ``path``, renamed into place."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class RunFiles:
    """The ``.pt`` files and ``metrics.jsonl`` of one run directory (None: keep nothing).
    Only the main process writes; every process reads."""

    def __init__(self, run_dir: Path | None, main: bool) -> None:
        self.run_dir, self.main = run_dir, main
        if run_dir and main:
            run_dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path | None:
        return self.run_dir / name if self.run_dir else None

    def exists(self, name: str) -> bool:
        path = self.path(name)
        return path is not None and path.exists()

    def save_weights(
        self, name: str, state: dict[str, Any], architecture: dict[str, Any] | None = None
    ) -> None:
        if self.run_dir and self.main:
            if architecture is not None:
                state = {**state, ARCHITECTURE_KEY: json.dumps(architecture)}
            save(state, self.run_dir / name)

    def load_weights(self, name: str, what: str, mmap: bool = False) -> dict[str, Any] | None:
        """The weights in ``name`` without their architecture record; None when absent."""
        if not self.exists(name):
            return None
        state = load_weights(self.path(name), what, mmap)  # type: ignore[arg-type]
        state.pop(ARCHITECTURE_KEY, None)
        return state

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self.run_dir and self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def write_checkpoint(
        self,
        model: dict[str, Any],
        optimizers: dict[str, Any],
        state: TrainState,
        stage_state: dict[str, Any] | None,
        rng: list[torch.Tensor],
    ) -> None:
        if self.run_dir and self.main:
            payload = {
                "model": model,
                "optimizers": optimizers,
                "state": asdict(state),
                "stage_state": stage_state,
                "torch_rng": rng,
                "world_size": len(rng),
            }
            save(payload, self.run_dir / "checkpoint.pt")

    def read_checkpoint(self, world_size: int) -> dict[str, Any] | None:
        """The checkpoint's payload (``"state"`` as a :class:`TrainState`); None when the
        run starts afresh. Refuses one written by another number of processes."""
        path = self.path("checkpoint.pt")
        if path is None or not path.exists():
            return None
        payload = load_weights(path, "checkpoint")
        if payload["world_size"] != world_size:
            raise RuntimeError(
                f"{path} was written by {payload['world_size']} process(es); resume it with "
                f"the same number (now {world_size})"
            )
        payload["state"] = TrainState(**payload["state"])
        return payload


class Checkpointed:
    """The trainer's persistence (a mixin of :class:`~ctr.training.trainer.Trainer`, which
    provides ``model``, ``net``, ``compressor``, ``placement``, ``files``, ``state``,
    ``config``, ``_setup_optimizers`` and ``_rebuilt``): whole weights, best and initial
    weights, rewinds, the checkpoint and resuming from it."""

    model: nn.Module
    net: nn.Module
    compressor: Compressor
    placement: Placement
    files: RunFiles
    config: TrainConfig
    state: TrainState
    stage_state: dict[str, Any] | None
    table_optimizers: dict[str, Any]
    _spill: Path | None

    # ---------------------------------------------------------------- rewinds
    def initial_state(self) -> dict[str, torch.Tensor]:
        """The model's weights at step 0, mapped from the file that holds them (read as
        they are used, not a second copy of every table kept in memory)."""
        state = self._read_weights("initial.pt", "initial weights")
        if state is None:
            raise RuntimeError(
                "the initial weights were not saved: only runs with a rewinding stage keep them"
            )
        return state

    def _rewind(self) -> None:
        """Every weight back to step 0, but the compressor's ``rewind_keep()`` entries;
        optimizer states start afresh (a lottery-ticket restart)."""
        prefix = _prefix_of(self.model, self.compressor)
        kept = self._compressor_entries(self.compressor.rewind_keep())
        initial = self.initial_state()
        # The compressor fits its own step-0 weights to shapes a rebuild may have changed.
        own = self.compressor.rewind_state(
            {k[len(prefix) :]: v for k, v in initial.items() if k.startswith(prefix)}
        )
        initial = {k: v for k, v in initial.items() if not k.startswith(prefix)}
        initial.update({prefix + k: v for k, v in own.items()})
        # The kept entries are read in place (no copy of every table) before the load.
        current = self.placement.live_state(self.model, self.net)
        state = {k: v for k, v in initial.items() if not kept(k)}
        state.update({k: v for k, v in current.items() if kept(k)})
        del current
        self._load_weights(state)
        # Fused table optimizers keep their state in place: zero it (rowwise Adagrad's
        # accumulators start at zero); the other optimizers are built anew.
        self.placement.reset_table_state(self.table_optimizers)
        for tables in table_modules(self.model):
            if tables.sparse_optimizer is not None:  # its step counts start afresh too
                tables.reset_optimizer(self.config.table_optimizer, self.config.table_lr)
        self._setup_optimizers()

    # ---------------------------------------------------------------- persistence
    def full_state(self) -> dict[str, torch.Tensor]:
        """Unsharded weights (a copy), on every rank."""
        return self.placement.full_state(self.model, self.net)

    def _flush_decay(self) -> None:
        """Lazily decayed rows brought up to date (before the weights are read whole)."""
        for rows in embedding_rows(self.model):
            rows.flush_decay()

    def _load_weights(self, state: dict[str, Any]) -> None:
        self.placement.load_state(self.model, self.net, state)

    def _compressor_entries(self, names: list[str]) -> Callable[[str], bool]:
        """Whether a state-dict name is one of the compressor's ``names`` (its
        ``rewind_keep()`` or ``architecture_state()``), prefixed as the model holds them."""
        prefix = _prefix_of(self.model, self.compressor)
        keep = tuple(prefix + k for k in names)
        return lambda k: k.startswith(keep) if keep else False

    def _live_state(self) -> dict[str, Any]:
        """Unsharded weights to write: the model's own tensors where this process holds them
        whole (writing them needs no copy of every table), else a gathered copy."""
        return self.placement.live_state(self.model, self.net)

    def _weights_path(self, name: str) -> Path:
        """Where this process keeps ``best.pt`` or ``initial.pt``: the run directory's file
        (main process), else a private temporary directory (no run directory, or another
        rank's copy, which must not race the main process's file)."""
        if self.files.run_dir and self.main:
            return self.files.run_dir / name
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="ctr-weights-"))
            weakref.finalize(self, shutil.rmtree, self._spill, True)  # its own directory
        return self._spill / name

    def _write_weights(
        self, name: str, architecture: dict[str, Any] | None = None, write: bool = True
    ) -> None:
        """The weights streamed to ``name``'s file (no copy of them kept in memory). Every
        rank reads them (under DMP a collective), ``write`` says whether this one writes."""
        state = self._live_state()
        if not write:
            return
        if architecture is not None:
            state[ARCHITECTURE_KEY] = json.dumps(architecture)
        save(state, self._weights_path(name))

    def _read_weights(self, name: str, what: str) -> dict[str, Any] | None:
        """``name``'s weights mapped from its file (a resumed run's other ranks read the run
        directory's); None when there is none."""
        path = self._weights_path(name)
        if not path.exists():
            path = self.files.path(name)  # type: ignore[assignment]
            if path is None or not path.exists():
                return None
        state = load_weights(path, what, mmap=True)
        state.pop(ARCHITECTURE_KEY, None)
        return state

    def _save_model(self, name: str) -> None:
        """``best.pt`` (kept on disk, in the run directory or a temporary one: never a whole
        copy in memory) or ``model.pt`` (only with a run directory)."""
        if name == "best.pt":
            self._write_weights(name, self.state.architecture)
        elif self.files.run_dir:
            self._write_weights(name, self.state.architecture, write=self.main)

    def _restore_best(self) -> None:
        best = self._read_weights("best.pt", "best weights")
        if best is None:
            return
        # Weights only: the architecture the stage ended with stays (masks, thresholds, α).
        architecture = self.compressor.architecture_state()
        if architecture:
            kept = self._compressor_entries(architecture)
            # Read in place (no copy of every table): the load below only copies into them.
            current = self.placement.live_state(self.model, self.net)
            best = {k: current[k] if kept(k) else v for k, v in best.items()}
            del current
        # Copied from the mapped file into the model's own tensors, the file's pages let go as
        # each module is loaded: else the whole file would be resident at the end, a second
        # copy of every table in this process's memory (if reclaimable).
        with _released_as_loaded(self.model, self._best_file()) as ranges:
            if self.placement.world_size == 1:  # the model's own tensors: no copy to read
                live = self.placement.live_state(self.model, self.net)
                best = _copy_mapped_into(live, best, ranges)
                del live
            self._load_weights(best)
        del best
        self._forget_best()

    def _best_file(self) -> Path | None:
        path = self._weights_path("best.pt")
        return path if path.exists() else self.files.path("best.pt")

    def _forget_best(self) -> None:
        """The stage is over (its best restored), and the next starts its own."""
        if self._spill is not None:
            (self._spill / "best.pt").unlink(missing_ok=True)

    def _save_initial(self) -> None:
        """Keeps the step-0 weights on disk when a stage will rewind to them."""
        if not any(s.rewind for s in self.compressor.stages):
            return
        self._write_weights("initial.pt")

    def _checkpoint(self) -> None:
        """Everything needed to continue exactly; under DMP gathered whole (collective)."""
        if not self.run_dir:
            return
        self.files.write_checkpoint(
            self._live_state(),  # written as the model holds them: no copy of every table
            {k: o.state_dict() for k, o in self._all_optimizers().items()},
            self.state,
            self.stage_state,
            self.placement.rng_states(),
        )

    def _resume(self) -> None:
        payload = self.files.read_checkpoint(self.placement.world_size)
        if payload is None:
            seed_everything(self.config.seed)
            self._save_initial()
            return
        state = payload["state"]
        if state.architecture is not None:
            self.compressor.rebuild(state.architecture)
            self._rebuilt()
        self._load_weights(payload["model"])
        for k, opt in self._all_optimizers().items():
            opt.load_state_dict(payload["optimizers"][k])
        self.state = state
        self._apply_lr_scale()
        self.stage_state = payload.get("stage_state")
        torch.set_rng_state(payload["torch_rng"][self.placement.rank])


@contextmanager
def _released_as_loaded(model: nn.Module, path: Path | None) -> Iterator[list[tuple[int, int]]]:
    """While loading ``model`` from tensors mapped (privately, read only) from ``path``:
    after each module is loaded, the file's resident pages are dropped from this process
    (``MADV_DONTNEED``: clean private pages refault from the file if read again), so at most
    about one module's tensors are resident at a time rather than the whole file."""
    ranges = mapped_ranges(path) if path is not None else []
    if not ranges:
        yield ranges
        return

    def release(*_: Any) -> None:
        release_mapped(ranges)

    handles = [m.register_load_state_dict_post_hook(release) for m in model.modules()]
    try:
        yield ranges
    finally:
        for h in handles:
            h.remove()
        release()


def _copy_mapped_into(
    live: dict[str, Any],
    state: dict[str, Any],
    ranges: list[tuple[int, int]],
    chunk_bytes: int | None = None,
) -> dict[str, Any]:
    """``state`` (mapped from a file) copied into the same-shaped ``live`` tensors in chunks
    of rows, the file's pages dropped after each chunk: a table held as one tensor (the
    pruning family's) is never resident whole from the file beside the model. Returns
    ``state`` with those entries replaced by the live tensors themselves, so the load that
    follows (with its modules' own rules) copies each onto itself, or from a temporary that
    now holds the restored values."""
    if not ranges:
        return state
    out = dict(state)
    with torch.no_grad():
        for k, src in state.items():
            dst = live.get(k)
            if (
                not isinstance(src, torch.Tensor)
                or not isinstance(dst, torch.Tensor)
                or dst is src
                or src.dim() == 0
                or dst.shape != src.shape
                or dst.dtype != src.dtype
                or dst.device != src.device
            ):
                continue
            copy_rows(dst, src, ranges, chunk_bytes)
            out[k] = dst
    return out


def _prefix_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """``module``'s state-dict prefix inside ``model`` (e.g. ``"embedding.compressor."``)."""
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError("module is not part of the model")
