"""Row-wise Adagrad outside fbgemm, and the sparse-row optimizers of a method's own rows.

fbgemm's fused rowwise Adagrad (what trains the physical tables) keeps one accumulator per
table row: ``s += mean(g_row²)``, ``w_row -= lr · g_row / (sqrt(s) + eps)``. This module holds
the one copy of that rule outside fbgemm (:func:`rowwise_adagrad_rows`), used by

- :class:`RowwiseAdagrad`, a ``torch.optim.Optimizer`` for ordinary parameters: the
  fair-comparison protocol (``TrainConfig(module_optimizer="table")``) trains TT cores,
  ROBE's array and DHE's network with the tables' family. TorchRec's ``RowWiseAdagrad`` only
  takes 2-D parameters, this one any shape: a row is a slice along the first dimension (a 1-D
  parameter has one-element rows, i.e. plain Adagrad);
- :class:`SparseRowOptimizer`, which steps only the rows a batch read, its state in buffers
  (integer tables, the pruning family's row tables).

And :class:`Adam`, torch's Adam whose parameters may also take sparse gradients and still
step every entry as dense Adam does (a method's per-entry parameters, e.g. PEP's
thresholds: one gradient row per row a batch read, but coupled L2 and the moments move
every entry at every step).

``eps`` is :data:`EPS` = 1e-8 everywhere: fbgemm's kernels default (its
``SplitTableBatchedEmbeddingBagsCodegen(eps=1.0e-8)``; TorchRec's fused tables pass no eps
and so train with it), so a module under the protocol and a table follow the same rule.

Example::

    opt = RowwiseAdagrad(module.parameters(), lr=0.05)
    rows_opt = SparseRowOptimizer("rowwise_adagrad", rows=1000, dim=16)
    new_values = rows_opt.step(rows, values, grads, lr=0.05)

Deviations: TorchRec's own ``RowWiseAdagrad`` defaults to eps 1e-10 (earlier versions of this
module did too); 1e-8 follows the kernel that actually trains the tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

#: The denominator's epsilon of every Adagrad and Adam here (fbgemm's default).
EPS = 1e-8


def rowwise_adagrad_rows(
    rows: torch.Tensor, grad: torch.Tensor, acc: torch.Tensor, lr: float, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row-wise Adagrad step of ``rows`` [N, D] with gradients ``grad`` [N, D] and
    accumulators ``acc`` [N]: ``(new rows, new accumulators)``."""
    acc = acc + grad.pow(2).mean(1)
    return rows - lr * grad / (acc.sqrt().unsqueeze(1) + eps), acc


class RowwiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row (first-dimension slice) of each parameter."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 0.01,
        eps: float = EPS,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(
                f"RowwiseAdagrad: bad lr={lr}, eps={eps} or weight_decay={weight_decay}"
            )
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                rows = grad.reshape(grad.shape[0], -1) if grad.dim() > 1 else grad.view(-1, 1)
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(rows.shape[0], device=p.device)
                values = p.reshape(rows.shape)
                new, state["sum"] = rowwise_adagrad_rows(
                    values, rows, state["sum"], group["lr"], group["eps"]
                )
                p.copy_(new.view_as(p))
        return loss


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` that also takes sparse gradients (``F.embedding(..., sparse=True)``)
    and applies them as the dense gradient they stand for: zeros but at their rows.

    Dense Adam with L2 (``weight_decay``, coupled) moves *every* entry at every step a
    parameter has a gradient: the decay term and the moments are never zero. A lazy Adam
    (``torch.optim.SparseAdam``) would leave the entries a batch did not read alone, which is
    another optimiser. This one keeps dense Adam's rule and result: the sparse values are
    written into a persistent zero buffer and the parameter's group steps with torch's fused
    kernel (one pass over parameter, gradient and moments, no temporaries), then the written
    rows are zeroed again. What it saves over a dense gradient is the per-step allocation of
    a gradient, the decayed gradient and the denominators of the whole parameter (four
    temporaries of its size, and their page faults). The state (``step``, ``exp_avg``,
    ``exp_avg_sq``) is torch's, checkpointed as usual; the buffer is not state.

    A group that never saw a sparse gradient steps exactly as in ``torch.optim.Adam``; one
    that did runs fused from then on. The fused kernel evaluates the same formula in another
    order: results agree with the unfused dense step to float rounding (a few ulps), not bit
    for bit.

    Example::

        opt = Adam([threshold], lr=0.1, weight_decay=1e-5)
        F.embedding(rows, threshold, sparse=True).sum().backward()
        opt.step()
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (torch's signature)
        super().__init__(*args, **kwargs)
        self._dense_grads: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        written = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not p.grad.is_sparse:
                    continue
                if not group["fused"]:
                    group["fused"] = True  # the kernel that reads the buffer in one pass
                    for state in (self.state[q] for q in group["params"] if q in self.state):
                        state["step"] = state["step"].to(p.device)  # where fused keeps it
                buf = self._dense_grads.get(id(p))
                if buf is None:
                    buf = self._dense_grads[id(p)] = torch.zeros_like(p)
                sparse = p.grad.coalesce()
                rows = sparse.indices()[0]
                buf.index_put_((rows,), sparse.values())
                written.append((p, p.grad, buf, rows))
                p.grad = buf
        try:
            return super().step(closure)
        finally:
            for p, grad, buf, rows in written:
                buf.index_fill_(0, rows, 0.0)
                p.grad = grad


class SparseRowOptimizer(nn.Module):
    """Updates only the rows a batch read; state lives in buffers (checkpointed with the model).

    ``sgd`` keeps nothing, ``rowwise_adagrad`` one float per row (fbgemm's default), ``adagrad``
    one float per value, ``adam`` two (first and second moments) plus a step count: *lazy*
    Adam, as TensorFlow's LazyAdam and PyTorch's ``SparseAdam`` — only the rows a batch read
    update their moments, bias correction uses the global step (β = 0.9, 0.999).
    """

    KINDS: ClassVar[tuple[str, ...]] = ("sgd", "rowwise_adagrad", "adagrad", "adam")
    BETAS: ClassVar[tuple[float, float]] = (0.9, 0.999)

    def __init__(
        self,
        kind: str,
        rows: int,
        dim: int,
        eps: float = EPS,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown optimizer {kind!r}; choose from {self.KINDS}")
        self.kind = kind
        self.eps = eps
        shape = {
            "sgd": (0,),
            "rowwise_adagrad": (rows,),
            "adagrad": (rows, dim),
            "adam": (2, rows, dim),
        }[kind]
        self.register_buffer("state", torch.zeros(shape, device=device))
        if kind == "adam":
            self.register_buffer("count", torch.zeros((), dtype=torch.int64, device=device))

    def step(
        self, rows: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, lr: float
    ) -> torch.Tensor:
        """The updated fp32 values of ``rows`` (unique) given their values and gradients."""
        if self.kind == "sgd":
            return weight - lr * grad
        if self.kind == "rowwise_adagrad":
            new, self.state[rows] = rowwise_adagrad_rows(
                weight, grad, self.state[rows], lr, self.eps
            )
            return new
        if self.kind == "adam":
            (b1, b2), t = self.BETAS, int(self.count) + 1
            self.count.fill_(t)
            m = b1 * self.state[0, rows] + (1 - b1) * grad
            v = b2 * self.state[1, rows] + (1 - b2) * grad.pow(2)
            self.state[0, rows], self.state[1, rows] = m, v
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            return weight - lr * m_hat / (v_hat.sqrt() + self.eps)
        acc = self.state[rows] + grad.pow(2)
        self.state[rows] = acc
        return weight - lr * grad / (acc.sqrt() + self.eps)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
