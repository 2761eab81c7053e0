"""TorchRec DistributedModelParallel for the same models, under ``torchrun``.

Physical tables are sharded table-wise with fbgemm's fused optimizer (on CPU the planner
may otherwise pick data-parallel for small tables, and the combined optimizer then fails
with "Duplicate param key"); everything else is replicated with DDP.

Example (run with ``torchrun --nproc_per_node 2 -m ctr.cli train ...``)::

    info = init_from_env()
    dmp = shard_model(model, info, table_optimizer="rowwise_adagrad", table_lr=0.05)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.optim.optimizers import in_backward_optimizer_filter

from compressors.storage import TABLE_OPTIMIZERS


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
    """Leaves the process group (without it a rank can abort at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_model(
    model: nn.Module, info: DistInfo, table_optimizer: str, table_lr: float
) -> DistributedModelParallel:
    """Wraps ``model`` in DMP, copying its current weights into the shards."""
    if table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"unknown table optimizer {table_optimizer!r}")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    constraints = {}
    for ebc in ebcs:
        apply_optimizer_in_backward(TABLE_OPTIMIZERS[table_optimizer], ebc.parameters(),
                                    {"lr": table_lr})
        for cfg in ebc.embedding_bag_configs():
            constraints[cfg.name] = ParameterConstraints(
                sharding_types=[ShardingType.TABLE_WISE.value], compute_kernels=["fused"]
            )
    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else \
        torch.device("cpu")
    topology = Topology(world_size=info.world_size, compute_device=device.type)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        model, sharders, dist.GroupMember.WORLD
    )
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=device,
        plan=plan, sharders=sharders,
    )
    load_full_state_dict(dmp, initial)
    return dmp


def dense_parameters(dmp: DistributedModelParallel) -> list[nn.Parameter]:
    """Parameters not trained by a fused in-backward optimizer."""
    return [p for _, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad]


def full_state_dict(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on every rank. Collective: call on all ranks."""
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype)
            value.gather(dst=0, out=full if dist.get_rank() == 0 else None)
            dist.broadcast(full, src=0)
            out[key] = full
        else:
            out[key] = value.detach().clone()
    return out


def load_full_state_dict(dmp: DistributedModelParallel, state: dict[str, torch.Tensor]) -> None:
    """Copies full tensors into the local shards (and replicated parameters) of ``dmp``."""
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            if key not in state:
                raise KeyError(f"state dict lacks {key!r}")
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
                    shard.tensor.copy_(state[key][index])
            else:
                value.copy_(state[key])
