"""Data-parallel helpers for a method's own replicated state (no ``ctr`` imports).

Under ``torchrun`` a method whose rows are not TorchRec tables (the pruning family's
:class:`~compressors.pruning.entry_table.EntryTable`, unfused sparse tables) keeps a whole
copy on every rank. Each rank reads only its share of the global batch, so before the
rows are stepped their gradients are averaged over the ranks: the update is then the one a
single process makes on the global batch (the loss is a mean over each rank's equal share,
so the mean of the ranks' gradients is the global batch's gradient), and every rank applies
it to identical rows with identical optimizer state — the copies never drift apart.

Single-process runs pay nothing: :func:`world_size` is 1 and every helper is the identity.

Example::

    rows, grad = average_rows(rows, grad)   # the union of every rank's rows, mean gradients
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Ranks of the default process group (1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (first dimensions may differ between ranks; the rest must agree)."""
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)  # NCCL: on the GPU
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return [p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)]


def average_rows(rows: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, grad)`` of the global batch from each rank's unique ``rows`` [N] and their
    gradients [N, ...]: the sorted union of the ranks' rows and the sum of the ranks'
    gradients over the world size (a row one rank did not read contributes zero there).
    Collective; the identity in one process."""
    world = world_size()
    if world == 1:
        return rows, grad
    all_rows = torch.cat(all_gather_rows(rows))
    all_grads = torch.cat(all_gather_rows(grad))
    union, inverse = torch.unique(all_rows, return_inverse=True)
    summed = grad.new_zeros((len(union), *grad.shape[1:])).index_add_(0, inverse, all_grads)
    return union, summed / world


def average_sparse(grad: torch.Tensor) -> torch.Tensor:
    """A sparse COO row gradient averaged over the ranks, still sparse (a lazy sparse
    optimizer then steps exactly the rows some rank's share of the batch read)."""
    if world_size() == 1:
        return grad
    g = grad.coalesce()
    rows, values = average_rows(g.indices()[0], g.values())
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, g.shape, check_invariants=False, is_coalesced=True
    )


def rank() -> int:
    """This process's rank (0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def batch_share(draw: Callable[[int], torch.Tensor], local: int) -> torch.Tensor:
    """Random draws for this rank's ``local`` rows of a global batch: ``draw(n)`` makes
    ``n`` rows' worth; the whole batch is drawn (every rank has the same generator state)
    and this rank's contiguous share kept, so draws and generator state are one process's
    on the global batch (each rank holds an equal contiguous share of it)."""
    world = world_size()
    if world == 1:
        return draw(local)
    start = rank() * local
    return draw(local * world)[start : start + local]


def union_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted union of every rank's unique ``rows`` and each one's ``values`` (values
    of a row must agree across the ranks that hold it: a replicated row's statistic).
    Collective; the identity in one process."""
    if world_size() == 1:
        return rows, values
    all_rows = torch.cat(all_gather_rows(rows))
    all_values = torch.cat(all_gather_rows(values))
    union, inverse = torch.unique(all_rows, return_inverse=True)
    out = values.new_zeros((len(union), *values.shape[1:]))
    return union, out.index_copy_(0, inverse, all_values)


def batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` with the global batch's statistics under torchrun (``norm`` without
    affine): every rank's sums pooled by a differentiable all-reduce, so the output, the
    gradients (averaged over ranks afterwards) and the running statistics are one
    process's on the global batch. ``torch.nn.SyncBatchNorm`` does this on GPUs only."""
    if world_size() == 1 or not norm.training:
        return norm(x)
    from torch.distributed.nn.functional import all_reduce

    local = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])])
    pooled = all_reduce(local)
    width = x.shape[1]
    n = pooled[-1]
    mean = pooled[:width] / n
    var = (pooled[width : 2 * width] / n - mean * mean).clamp_min(0.0)
    if norm.track_running_stats:
        with torch.no_grad():
            m = norm.momentum if norm.momentum is not None else 0.1
            norm.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            norm.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
            norm.num_batches_tracked.add_(1)
    return (x - mean) / torch.sqrt(var + norm.eps)


def average(t: torch.Tensor) -> torch.Tensor:
    """``t``'s mean over the ranks (dense; collective; ``t`` itself in one process): for a
    gradient hook that must see the global batch's gradient, not this rank's share."""
    world = world_size()
    if world == 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out / world
