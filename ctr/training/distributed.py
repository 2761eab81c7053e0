"""TorchRec DistributedModelParallel for the same models, under ``torchrun``.

Physical tables are sharded table-wise with fbgemm's fused optimizer (on CPU the planner
may otherwise pick data-parallel for small tables, and the combined optimizer then fails
with "Duplicate param key"); everything else is replicated with DDP.

Example (run with ``torchrun --nproc_per_node 2 -m ctr.cli train ...``)::

    info = init_from_env()
    dmp = shard_model(model, info, table_optimizer="rowwise_adagrad", table_lr=0.05)
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.optim.optimizers import in_backward_optimizer_filter

from compressors.core.collective import average_sparse
from compressors.core.storage import TABLE_OPTIMIZERS


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo | None:
    """Joins the process group ``torchrun`` describes; None when running alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), backend)


def shutdown() -> None:
    """Leaves the process group (without it a rank can abort at exit).

    Models, DMP wrappers and pending work still in reference cycles hold the group's backend
    (and its worker threads) alive past ``destroy_process_group``, to be torn down during
    interpreter finalisation, where a C++ thread can be destroyed unjoined ("terminate called
    without an active exception"); collecting them first lets the backend go here, in order.
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


class _NoDataParallel(DataParallelWrapper):
    """Leaves the unsharded modules unwrapped: the trainer averages their gradients itself
    (:func:`average_gradients`)."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        pass


def shard_model(
    model: nn.Module, info: DistInfo, table_optimizer: str, table_lr: float, ddp: bool = True
) -> DistributedModelParallel:
    """Wraps ``model`` in DMP, copying its current weights into the shards; with
    ``ddp=False`` the rest is left to :func:`average_gradients` instead of DDP (made
    identical across ranks here)."""
    if table_optimizer == "adam":
        raise ValueError(
            "--table-optimizer adam trains its tables outside fbgemm's fused kernels (fbgemm has "
            "no CPU Adam), which DMP cannot shard; train it without torchrun"
        )
    if table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"unknown table optimizer {table_optimizer!r}")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    constraints = {}
    for ebc in ebcs:
        apply_optimizer_in_backward(
            TABLE_OPTIMIZERS[table_optimizer], ebc.parameters(), {"lr": table_lr}
        )
        for cfg in ebc.embedding_bag_configs():
            constraints[cfg.name] = ParameterConstraints(
                sharding_types=[ShardingType.TABLE_WISE.value], compute_kernels=["fused"]
            )
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if info.backend == "nccl"
        else torch.device("cpu")
    )
    topology = Topology(world_size=info.world_size, compute_device=device.type)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        model, sharders, dist.GroupMember.WORLD
    )
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=device,
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=None if ddp else _NoDataParallel(),
    )
    load_full_state_dict(dmp, initial)
    if not ddp:
        broadcast_replicated(dmp)  # DDP would have broadcast rank 0's parameters
    return dmp


def average_gradients(params: list[nn.Parameter]) -> None:
    """Replaces each parameter's gradient by its mean over the ranks. Collective.

    Each rank's loss is the mean over its equal share of the global batch, so the mean of
    the ranks' gradients is the global batch's: the step equals one process's. A parameter
    without a gradient on some ranks (a batch share that missed it) gets zeros there; one
    without a gradient anywhere keeps none (its optimizer skips it, as in one process).
    Dense gradients go in one flat all-reduce per dtype; sparse row gradients (unfused
    tables) are gathered and summed per row, staying sparse (memory of the rows read, not
    of the table).
    """
    if not params:
        return
    kinds = torch.tensor(
        [0 if p.grad is None else 2 if p.grad.is_sparse else 1 for p in params],
        dtype=torch.int8,
        device=params[0].device,  # NCCL reduces device tensors only
    )
    dist.all_reduce(kinds, op=dist.ReduceOp.MAX)
    dense: dict[torch.dtype, list[nn.Parameter]] = {}
    for p, kind in zip(params, kinds.tolist(), strict=True):
        if kind == 2:
            grad = p.grad if p.grad is not None else _empty_sparse(p)
            p.grad = average_sparse(grad)
        elif kind == 1:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dense.setdefault(p.grad.dtype, []).append(p)
    world = dist.get_world_size()
    for group in dense.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def _empty_sparse(p: torch.Tensor) -> torch.Tensor:
    return torch.sparse_coo_tensor(
        torch.zeros((1, 0), dtype=torch.int64, device=p.device),
        p.new_zeros((0, *p.shape[1:])),
        p.shape,
    )


_GLOO_CARRIERS = {torch.bool: torch.uint8, torch.int16: torch.int32}


@torch.no_grad()
def broadcast_replicated(module: nn.Module) -> None:
    """Copies rank 0's plain (unsharded) parameters and buffers to every rank. Collective."""
    for value in module.state_dict().values():
        if not isinstance(value, torch.Tensor) or isinstance(value, ShardedTensor):
            continue
        carrier_dtype = _GLOO_CARRIERS.get(value.dtype)
        if carrier_dtype is not None:  # gloo has no bool or int16 broadcast
            carrier = value.to(carrier_dtype)
            dist.broadcast(carrier, src=0)
            value.copy_(carrier)
        else:
            dist.broadcast(value, src=0)


def dense_parameters(dmp: DistributedModelParallel) -> list[nn.Parameter]:
    """Parameters not trained by a fused in-backward optimizer."""
    return [p for _, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad]


_SHARDED = "__sharded__"


def unshard(tree: Any) -> Any:
    """``tree`` (nested dicts) with every ShardedTensor assembled whole, on every rank.

    Ranks may hold different keys (a fused optimizer lists only its local tables), so each
    rank sends its local shards in one ``all_gather_object`` and the trees are merged.
    Collective: call on all ranks.
    """
    pieces: dict[tuple, tuple[list[int], torch.dtype, list]] = {}

    def collect(node: Any, path: tuple) -> Any:
        if isinstance(node, ShardedTensor):
            shards = [
                (list(sh.metadata.shard_offsets), sh.tensor.detach().cpu().clone())
                for sh in node.local_shards()
            ]
            pieces[path] = (list(node.size()), node.dtype, shards)
            return (_SHARDED, path)
        if isinstance(node, dict):
            return {k: collect(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, torch.Tensor):
            return node.detach().cpu().clone()
        return node

    skeleton = collect(tree, ())
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (skeleton, pieces))
    whole: dict[tuple, torch.Tensor] = {}
    for _, rank_pieces in everyone:
        for path, (size, dtype, shards) in rank_pieces.items():
            full = whole.setdefault(path, torch.empty(size, dtype=dtype))
            for offsets, tensor in shards:
                full[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True))] = (
                    tensor
                )
    merged = _merge([s for s, _ in everyone])
    return _fill(merged, whole)


def _merge(trees: list[Any]) -> Any:
    """Union of nested dicts (a key present on any rank is kept)."""
    if not all(isinstance(t, dict) for t in trees):
        return trees[0]
    keys = list(dict.fromkeys(k for t in trees for k in t))
    return {k: _merge([t[k] for t in trees if k in t]) for k in keys}


def _fill(node: Any, whole: dict[tuple, torch.Tensor]) -> Any:
    if isinstance(node, tuple) and len(node) == 2 and node[0] == _SHARDED:
        return whole[node[1]]
    if isinstance(node, dict):
        return {k: _fill(v, whole) for k, v in node.items()}
    return node


def copy_into_shards(target: Any, full: Any, where: str = "") -> None:
    """Copies whole tensors of ``full`` into the matching (sharded or plain) tensors of
    ``target`` in place; both are nested dicts of the same shape."""
    if isinstance(target, ShardedTensor):
        for shard in target.local_shards():
            offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
            shard.tensor.copy_(full[index])
    elif isinstance(target, torch.Tensor):
        target.copy_(full)
    elif isinstance(target, dict):
        for key, value in target.items():
            if key not in full:
                raise KeyError(f"saved state lacks {where}{key!r}")
            copy_into_shards(value, full[key], f"{where}{key}.")


def full_state_dict(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """The unsharded model state dict, on every rank. Collective."""
    return unshard(dmp.state_dict())


def load_full_state_dict(dmp: DistributedModelParallel, state: dict[str, torch.Tensor]) -> None:
    """Copies full tensors into the local shards (and replicated parameters) of ``dmp``."""
    with torch.no_grad():
        copy_into_shards(dmp.state_dict(), state)


class ShardedTableOptimizer:
    """Checkpoint view of DMP's fused table optimizer: whole tensors out, shards back in."""

    def __init__(self, dmp: DistributedModelParallel) -> None:
        self.optimizer = dmp.fused_optimizer

    def state_dict(self) -> dict[str, Any]:
        return unshard(self.optimizer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            copy_into_shards(self.optimizer.state_dict()["state"], state["state"])
