"""Row-wise Adagrad for ordinary parameters: the fused tables' rule, for embedding modules.

fbgemm's rowwise Adagrad keeps one accumulator per table row: ``s += mean(g_row²)``,
``w_row -= lr · g_row / (sqrt(s) + eps)``. The fair-comparison protocol trains TT cores,
ROBE's array and DHE's network with the same family (``TrainConfig(module_optimizer="table")``);
TorchRec's ``RowWiseAdagrad`` only takes 2-D parameters, this one any shape: a row is a slice
along the first dimension (a 1-D parameter has one-element rows, i.e. plain Adagrad).

Example::

    opt = RowwiseAdagrad(module.parameters(), lr=0.05)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RowwiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row (first-dimension slice) of each parameter."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 0.01,
        eps: float = 1e-10,
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
                    state["sum"] = torch.zeros(rows.shape[0], dtype=torch.float32)
                state["sum"].add_(rows.pow(2).mean(dim=1))
                scale = group["lr"] / (state["sum"].sqrt() + group["eps"])
                p.sub_((rows * scale.unsqueeze(1)).view_as(p))
        return loss
