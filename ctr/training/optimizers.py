"""The trainer's optimizers besides the fused tables: a method's parameter groups and the
dense network's Adam.

A method's groups (:meth:`~compressors.core.base.Compressor.optimizer_groups`) use the
optimizer they declare; ``"embedding"`` groups under ``module_optimizer="table"`` use the
tables' family and learning rate instead (the fair-comparison protocol); everything else
trains with Adam at ``TrainConfig.lr``.

Example::

    optimizers = build_optimizers(compressor, dense_params, config)
    optimizers.train["dense"].step()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from compressors.core.optim import Adam, RowwiseAdagrad

if TYPE_CHECKING:
    from compressors.core.base import Compressor
    from ctr.training.config import TrainConfig

# Optimizers a compressor's parameter group may ask for (and the protocol's module families).
OPTIMIZERS: dict[str, Any] = {
    "adam": Adam,  # torch's, taking sparse gradients as dense Adam (PEP's thresholds)
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowwiseAdagrad,
}


@dataclass
class Optimizers:
    """``train``: stepped on training batches (``"dense"`` the network's Adam, and
    ``"compressor<i>"`` per method group); ``valid``: on a bilevel stage's validation
    batches; ``embedding``: the train groups holding embedding parameters (plateau decay
    and embedding L2 apply to them)."""

    train: dict[str, Any] = field(default_factory=dict)
    valid: dict[str, Any] = field(default_factory=dict)
    embedding: list[str] = field(default_factory=list)


def build_optimizers(
    compressor: Compressor, dense: list[torch.nn.Parameter], cfg: TrainConfig
) -> Optimizers:
    """Every optimizer afresh; ``dense`` are the parameters no fused table trains."""
    out = Optimizers()
    claimed: set[int] = set()
    for i, group in enumerate(compressor.optimizer_groups()):
        params = [p for p in group["params"] if p.requires_grad]
        claimed |= {id(p) for p in params}
        kind, role = group.get("optimizer", "adam"), group.get("role", "train")
        if kind not in OPTIMIZERS or role not in ("train", "valid"):
            raise ValueError(
                f"{compressor.name}: optimizer group {i} has optimizer {kind!r} and "
                f"role {role!r}; expected {'|'.join(OPTIMIZERS)} and train|valid"
            )
        lr = group.get("lr") or cfg.lr
        wd = group.get("weight_decay", 0.0)
        if group.get("embedding") and role == "train":
            # Embedding parameters: decoupled L2 and plateau decay like the tables; under
            # the protocol also the tables' optimizer family and learning rate.
            out.embedding.append(f"compressor{i}")
            if cfg.module_optimizer == "table":
                kind, lr = cfg.table_optimizer, cfg.table_lr
        opt = OPTIMIZERS[kind](params, lr=lr, weight_decay=wd)
        for g in opt.param_groups:
            g["base_lr"] = lr
        (out.valid if role == "valid" else out.train)[f"compressor{i}"] = opt
    rest = [p for p in dense if id(p) not in claimed]
    out.train["dense"] = torch.optim.Adam(rest, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return out
