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

    def live_state(self, model: nn.Module, net: nn.Module) -> dict[str, Any]:
        """Unsharded weights to read before a load replaces them: the model's own tensors
        where this process holds them whole (no copy of every table), else a copy."""
        return self.full_state(model, net)

    @abstractmethod
    def load_state(self, model: nn.Module, net: nn.Module, state: dict[str, Any]) -> None:
        """Loads whole weights into the model (or its shards)."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated (evaluation pools all predictions)."""
        return t

    def replicated_parameters(self, model: nn.Module, net: nn.Module) -> list[nn.Parameter]:
        """Parameters whose gradients :meth:`average_gradients` must average (none in one
        process, or where DDP does it)."""
        return []

    def average_gradients(self, params: list[nn.Parameter]) -> None:  # noqa: B027
        """Averages ``params``' gradients over the ranks (collective; nothing in one
        process)."""

    def sync(self, model: nn.Module) -> None:  # noqa: B027
        """Makes every rank's replicated state rank 0's (collective; nothing in one
        process)."""

    def rewrap(self, model: nn.Module, net: nn.Module, config: TrainConfig) -> nn.Module:
        """The module to train after a stage rebuilt the method's tables."""
        return net

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

    def rewrap(self, model: nn.Module, net: nn.Module, config: TrainConfig) -> nn.Module:
        # A rebuild made its new tables on the host; the fused kernel is built for theirs.
        return net if self.device.type == "cpu" else net.to(self.device)

    def setup_tables(
        self, model: nn.Module, net: nn.Module, config: TrainConfig
    ) -> tuple[list[nn.Parameter], dict[str, Any]]:
        return _setup_local_tables(model, config)

    def set_table_lr(self, tables: dict[str, Any], lr: float) -> None:
        _set_local_table_lr(tables, lr)

    def reset_table_state(self, tables: dict[str, Any]) -> None:
        for opt in tables.values():
            _zero_tensors(opt.state_dict()["state"])

    def full_state(self, model: nn.Module, net: nn.Module) -> dict[str, Any]:
        return _local_state(model)

    def live_state(self, model: nn.Module, net: nn.Module) -> dict[str, Any]:
        return _local_state(model, copy_tensors=False)

    def load_state(self, model: nn.Module, net: nn.Module, state: dict[str, Any]) -> None:
        _load_local_state(model, state)


class Sharded(Placement):
    """TorchRec DMP under ``torchrun``: tables sharded table-wise with fbgemm's fused
    optimizer, everything else replicated (:mod:`ctr.training.distributed`).

    A method that trains data-parallel (``Compressor.data_parallel``: the pruning family,
    OptEmbed, DNIS, AutoDim) runs its stages on every rank. Its replicated parameters'
    gradients are averaged explicitly after each backward (:meth:`average_gradients`, in
    place of DDP, whose static graph cannot follow parameters that stop being used, a
    backward towards the architecture parameters only, or a rebuild), and its state is
    made rank 0's after each stage (:meth:`sync`). When it has no TorchRec tables, or its
    table optimizer has no fused kernel (Adam), nothing is sharded: the whole model is
    replicated (``replicate``) and trains as in one process on the averaged gradients.
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.rank, self.world_size = info.rank, info.world_size
        self.replicate = False  # the whole model on every rank (set by check)
        self.explicit = False  # gradients averaged by average_gradients, not DDP

    def check(self, compressor: Compressor, config: TrainConfig) -> None:
        from compressors.core.storage import SPARSE_TABLE_OPTIMIZERS

        self.explicit = compressor.data_parallel
        self.replicate = compressor.data_parallel and (
            config.table_optimizer in SPARSE_TABLE_OPTIMIZERS or not table_modules(compressor)
        )
        if self.replicate:
            return  # every rank trains the whole model on averaged gradients
        if compressor.data_parallel:
            if config.embedding_l2:
                raise RuntimeError(
                    f"{compressor.name}: embedding_l2 on tables DMP shards runs in a single "
                    "process only (with --table-optimizer adam the tables are replicated "
                    "and take it)"
                )
            # A procedure of the method reads its tables whole, which DMP holds as shards.
            procedures = [s.name for s in compressor.stages if not s.trains]
            if procedures:
                raise RuntimeError(
                    f"{compressor.name}: stages {procedures} read the tables whole, which DMP "
                    "shards under --table-optimizer "
                    f"{config.table_optimizer}; train it with --table-optimizer adam (its "
                    "tables are then replicated) or without torchrun"
                )
            return
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
        if self.replicate:
            if self.device.type != "cpu":  # NCCL broadcasts, and batches arrive, on the GPU
                model = model.to(self.device)
            self.sync(model)  # identical from the start, whatever each rank initialised
            return model
        return shard_model(
            model,
            self.info,
            config.table_optimizer,  # type: ignore[arg-type]
            config.table_lr,  # type: ignore[arg-type]
            ddp=not self.explicit,
        )

    def rewrap(self, model: nn.Module, net: nn.Module, config: TrainConfig) -> nn.Module:
        if self.replicate:
            return net if self.device.type == "cpu" else net.to(self.device)
        # A rebuild replaced the sharded tables by new, unsharded ones: shard those.
        return self.wrap(model, config)

    def setup_tables(
        self, model: nn.Module, net: nn.Module, config: TrainConfig
    ) -> tuple[list[nn.Parameter], dict[str, Any]]:
        from ctr.training.distributed import ShardedTableOptimizer, dense_parameters

        if self.replicate:
            return _setup_local_tables(model, config)
        return dense_parameters(net), {"tables": ShardedTableOptimizer(net)}  # type: ignore[arg-type]

    def set_table_lr(self, tables: dict[str, Any], lr: float) -> None:
        if self.replicate:
            _set_local_table_lr(tables, lr)
        # else DMP's fused optimizer keeps the lr it was sharded with

    def reset_table_state(self, tables: dict[str, Any]) -> None:
        for opt in tables.values():
            inner = opt if self.replicate else opt.optimizer
            _zero_tensors(inner.state_dict()["state"])

    def full_state(self, model: nn.Module, net: nn.Module) -> dict[str, Any]:
        from ctr.training.distributed import full_state_dict

        if self.replicate:
            return _local_state(model)
        return full_state_dict(net)  # type: ignore[arg-type]

    def live_state(self, model: nn.Module, net: nn.Module) -> dict[str, Any]:
        if self.replicate:
            return _local_state(model, copy_tensors=False)
        return self.full_state(model, net)

    def load_state(self, model: nn.Module, net: nn.Module, state: dict[str, Any]) -> None:
        from ctr.training.distributed import load_full_state_dict

        if self.replicate:
            _load_local_state(model, state)
        else:
            load_full_state_dict(net, state)  # type: ignore[arg-type]

    def replicated_parameters(self, model: nn.Module, net: nn.Module) -> list[nn.Parameter]:
        from ctr.training.distributed import dense_parameters

        if not self.explicit:
            return []  # DDP averages them
        if self.replicate:  # unfused tables' sparse gradients included
            return [p for p in model.parameters() if p.requires_grad]
        return dense_parameters(net)  # type: ignore[arg-type]

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        from ctr.training.distributed import average_gradients

        if self.explicit:
            average_gradients(params)

    def sync(self, model: nn.Module) -> None:
        from ctr.training.distributed import broadcast_replicated

        if self.explicit:
            broadcast_replicated(model)

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


def _setup_local_tables(
    model: nn.Module, config: TrainConfig
) -> tuple[list[nn.Parameter], dict[str, Any]]:
    """Fuses the tables in place (or readies their sparse optimizer) and sets the rows'
    optimizer and L2: (parameters the trainer's optimizers own, the table optimizers)."""
    tables = table_modules(model)
    for t in tables:
        t.fuse(config.table_optimizer, config.table_lr)  # type: ignore[arg-type]
    for rows in embedding_rows(model):
        rows.use_optimizer(config.table_optimizer)
        rows.set_weight_decay(config.embedding_l2, config.l2_mode)
    fused = {id(p) for t in tables for p in t.parameters()}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in fused]
    return dense, {f"tables{i}": t.table_optimizer() for i, t in enumerate(tables)}


def _set_local_table_lr(tables: dict[str, Any], lr: float) -> None:
    for opt in tables.values():
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()  # a fused optimizer hands its lr to fbgemm on step()/zero_grad()


def _local_state(model: nn.Module, copy_tensors: bool = True) -> dict[str, Any]:
    for rows in embedding_rows(model):
        rows.flush_decay()  # lazily decayed rows brought up to date
    # Extra state (get_extra_state) may hold plain values beside the tensors.
    return {
        k: (v.detach().clone() if copy_tensors else v.detach())
        if isinstance(v, torch.Tensor)
        else copy.deepcopy(v)
        for k, v in model.state_dict().items()
    }


def _load_local_state(model: nn.Module, state: dict[str, Any]) -> None:
    model.load_state_dict(state)
    for rows in embedding_rows(model):
        if rows.decay is not None:
            rows.decay.reset()
