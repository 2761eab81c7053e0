"""Where a model trains: one process (fused tables in place) or TorchRec DMP shards.

The trainer and ``train_run`` ask a :class:`Placement`, chosen once from ``torchrun``'s
environment (:func:`placement_for`), for everything that differs between the two: wrapping
the model, the table optimizers, whole-state gathering and loading, the pooled evaluation,
the RNG states a checkpoint keeps, and what a sharded run refuses.

Example::

    placement = placement_for(init_from_env())
    net = placement.wrap(model, config)
    state = placement.full_state(model, net)        # whole tensors, on every rank
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressors.core.decay import EmbeddingRows
from compressors.core.storage import TrainTables

if TYPE_CHECKING:
    from compressors.core.base import Compressor
    from ctr.training.config import TrainConfig
    from ctr.training.distributed import DistInfo


def table_modules(model: nn.Module) -> list[TrainTables]:
    return [m for m in model.modules() if isinstance(m, TrainTables)]


def embedding_rows(model: nn.Module) -> list[EmbeddingRows]:
    """Modules holding embedding rows that take the run's decoupled L2: TorchRec tables and
    a method's own row tables (the pruning family's)."""
    return [m for m in model.modules() if isinstance(m, EmbeddingRows)]


class Placement(ABC):
    """One process or DMP shards (see module docstring)."""

    rank: int = 0
    world_size: int = 1
    #: Where the model computes (set by :meth:`wrap`); batches follow it (:meth:`to_device`).
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_device(self, batch: Any) -> Any:
        """``batch`` (a TorchRec ``Batch``) on the model's device; on the CPU, itself."""
        if self.device.type == "cpu":
            return batch
        return batch.to(self.device, non_blocking=True)

    @abstractmethod
    def check(self, compressor: Compressor, config: TrainConfig) -> None:
        """Refuses what this placement cannot train (before anything is built)."""

    @abstractmethod
    def wrap(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        """The module the trainer runs: ``model`` itself or its DMP wrapper."""

    @abstractmethod
    def setup_tables(
        self, model: nn.Module, net: nn.Module, config: TrainConfig
    ) -> tuple[list[nn.Parameter], dict[str, Any]]:
        """(Parameters the trainer's optimizers own, the table optimizers by checkpoint key)
        after fusing or re-fusing the tables for ``config``."""

    @abstractmethod
    def set_table_lr(self, tables: dict[str, Any], lr: float) -> None:
        """Hands the embedding learning rate now to the fused table optimizers."""

    @abstractmethod
    def reset_table_state(self, tables: dict[str, Any]) -> None:
        """Zeroes the fused table optimizers' state (a rewind's fresh start)."""

    @abstractmethod
    def full_state(self, model: nn.Module, net: nn.Module) -> dict[str, Any]:
        """Unsharded weights (a copy), on every rank."""

    @abstractmethod
    def load_state(self, model: nn.Module, net: nn.Module, state: dict[str, Any]) -> None:
        """Loads whole weights into the model (or its shards)."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated (evaluation pools all predictions)."""
        return t

    def rng_states(self) -> list[torch.Tensor]:
        """Every rank's torch RNG state (dropout draws differ per rank)."""
        return [torch.get_rng_state()]

    @abstractmethod
    def barrier(self) -> None:
        """Waits for every rank."""


class SingleProcess(Placement):
    """One process: each EBC becomes a ``FusedEmbeddingBagCollection`` in place."""

    def check(self, compressor: Compressor, config: TrainConfig) -> None:
        pass  # one process trains every method

    def barrier(self) -> None:
        pass

    def wrap(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        from ctr.training.device import resolve_device

        self.device = resolve_device(config.device)
        # Before the tables are fused: the fused kernel is built for the weights' device.
        return model if self.device.type == "cpu" else model.to(self.device)

    def setup_tables(
        self, model: nn.Module, net: nn.Module, config: TrainConfig
    ) -> tuple[list[nn.Parameter], dict[str, Any]]:
        tables = table_modules(model)
        for t in tables:
            t.fuse(config.table_optimizer, config.table_lr)  # type: ignore[arg-type]
        for rows in embedding_rows(model):
            rows.use_optimizer(config.table_optimizer)
            rows.set_weight_decay(config.embedding_l2, config.l2_mode)
        fused = {id(p) for t in tables for p in t.parameters()}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in fused]
        return dense, {f"tables{i}": t.table_optimizer() for i, t in enumerate(tables)}

    def set_table_lr(self, tables: dict[str, Any], lr: float) -> None:
        for opt in tables.values():
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()  # a fused optimizer hands its lr to fbgemm on step()/zero_grad()

    def reset_table_state(self, tables: dict[str, Any]) -> None:
        for opt in tables.values():
            _zero_tensors(opt.state_dict()["state"])

    def full_state(self, model: nn.Module, net: nn.Module) -> dict[str, Any]:
        for rows in embedding_rows(model):
            rows.flush_decay()  # lazily decayed rows brought up to date
        # Extra state (get_extra_state) may hold plain values beside the tensors.
        return {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in model.state_dict().items()
        }

    def load_state(self, model: nn.Module, net: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(state)
        for rows in embedding_rows(model):
            if rows.decay is not None:
                rows.decay.reset()


class Sharded(Placement):
    """TorchRec DMP under ``torchrun``: tables sharded table-wise with fbgemm's fused
    optimizer, everything else replicated (:mod:`ctr.training.distributed`)."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.rank, self.world_size = info.rank, info.world_size

    def check(self, compressor: Compressor, config: TrainConfig) -> None:
        if config.embedding_l2:
            raise RuntimeError("embedding_l2 runs in a single process only (not under DMP)")
        if config.table_optimizer == "adam":
            raise ValueError(
                f"{compressor.name}: table optimizer adam (the method's default, or "
                "--table-optimizer adam) trains its tables outside fbgemm's fused kernels, "
                "which DMP cannot shard; train it without torchrun or pass --table-optimizer "
                "rowwise_adagrad"
            )
        # Bilevel and reshaping stages, and a method's own procedures (searches,
        # quantisation passes: they read whole tables that DMP holds as shards), run in
        # one process only; refusing beats hanging in a collective.
        special = [s.name for s in compressor.stages if s.bilevel or s.rebuilds or not s.trains]
        if special:
            raise RuntimeError(
                f"{compressor.name}: stages {special} (bilevel, reshaping or the "
                "method's own procedure) run in a single process only; train it without "
                "torchrun"
            )

    def wrap(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        from ctr.training.distributed import shard_model

        if self.info.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

        return shard_model(model, self.info, config.table_optimizer, config.table_lr)  # type: ignore[arg-type]

    def setup_tables(
        self, model: nn.Module, net: nn.Module, config: TrainConfig
    ) -> tuple[list[nn.Parameter], dict[str, Any]]:
        from ctr.training.distributed import ShardedTableOptimizer, dense_parameters

        return dense_parameters(net), {"tables": ShardedTableOptimizer(net)}  # type: ignore[arg-type]

    def set_table_lr(self, tables: dict[str, Any], lr: float) -> None:
        pass  # DMP's fused optimizer keeps the lr it was sharded with

    def reset_table_state(self, tables: dict[str, Any]) -> None:
        for opt in tables.values():
            _zero_tensors(opt.optimizer.state_dict()["state"])

    def full_state(self, model: nn.Module, net: nn.Module) -> dict[str, Any]:
        from ctr.training.distributed import full_state_dict

        return full_state_dict(net)  # type: ignore[arg-type]

    def load_state(self, model: nn.Module, net: nn.Module, state: dict[str, Any]) -> None:
        from ctr.training.distributed import load_full_state_dict

        load_full_state_dict(net, state)  # type: ignore[arg-type]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def rng_states(self) -> list[torch.Tensor]:
        import torch.distributed as dist

        state = torch.get_rng_state()
        states = [torch.empty_like(state) for _ in range(self.world_size)]
        dist.all_gather(states, state)
        return states

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def placement_for(info: DistInfo | None) -> Placement:
    """:class:`Sharded` under ``torchrun`` (``info`` from ``init_from_env``), else
    :class:`SingleProcess`."""
    return SingleProcess() if info is None else Sharded(info)


def _zero_tensors(tree: Any) -> None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(tree, ShardedTensor):
        for shard in tree.local_shards():
            shard.tensor.zero_()
    elif isinstance(tree, torch.Tensor):
        tree.zero_()
    elif isinstance(tree, dict):
        for v in tree.values():
            _zero_tensors(v)
