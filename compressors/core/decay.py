"""Embedding L2 on fused tables: decoupled weight decay, applied lazily at sparse cost.

fbgemm's CPU fused optimizers ignore ``weight_decay``, and a dense decay touches every row of
every table at every step. :class:`RowDecay` gives the tables *decoupled* weight decay
(Loshchilov & Hutter's "W" form: after each step every row is scaled by ``1 - lr·λ``) in one
of two modes:

* ``"dense"`` — the reference: after every step, every row is multiplied by ``1 - lr·λ``
  (O(table) per step; fine for small tables and for tests);
* ``"lazy"`` — each row remembers the cumulative log-factor ``Σ log(1 - lr_t·λ)`` at the time
  it was last brought up to date; when a batch looks it up, it is first scaled by
  ``exp(now - last)``, i.e. by the product of the factors of the steps it missed. Before
  weights are read whole (evaluation of all rows, checkpoint, export) :meth:`flush` brings
  every row up to date.

Why this is exact: a row's value changes only (a) by the optimizer when a batch looks it up
(fbgemm's sparse updates leave other rows alone) and (b) by the decay. Lazy mode hands each
row, at every lookup, exactly the value dense mode would hold (the product of the missed
factors, taken in float64), so gradients, optimizer updates and accumulator states agree;
differences are fp32 rounding only (``c·c·…·c`` vs ``c^k``). The cumulative log-factor keeps
this exact when the learning rate changes mid-run (decay on plateau).

What "L2" means under each optimiser: for SGD, decoupled decay equals L2 in the gradient
(``g + λw``) up to O(lr²λ) (the decay applies to the updated row, not the pre-step one). For
(rowwise) Adagrad the two differ: L2 in the gradient would enter the squared-gradient
accumulator and be damped by it; decoupled decay does not, which is the form that
regularises all rows alike and the one that can be deferred exactly. We use decoupled decay
for every embedding parameter of every method (tables, and modules via the trainer).

Example::

    decay = RowDecay(weights, rate=1e-4, mode="lazy")
    decay.touch({"t0": ids})        # before a lookup: rows ids are brought up to date
    decay.advance(lr=0.05)          # after the optimizer step
    decay.flush()                   # before reading the tables whole
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

DECAY_MODES = ("lazy", "dense")


class RowDecay:
    """Decoupled weight decay ``rate`` on a set of ``[rows, dim]`` weight tensors (in place)."""

    def __init__(
        self, weights: Mapping[str, torch.Tensor], rate: float, mode: str = "lazy"
    ) -> None:
        if mode not in DECAY_MODES:
            raise ValueError(f"embedding L2 mode must be one of {DECAY_MODES}, got {mode!r}")
        if rate < 0:
            raise ValueError(f"embedding L2 must be >= 0, got {rate}")
        self.weights = dict(weights)
        self.rate = rate
        self.mode = mode
        self.now = 0.0  # Σ log(1 - lr_t·rate) over the steps taken (float64)
        self.last = (
            {
                k: torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
                for k, w in self.weights.items()
            }
            if mode == "lazy" and rate > 0
            else {}
        )

    @property
    def active(self) -> bool:
        return self.rate > 0

    def state_bytes(self) -> int:
        """Training memory the lazy mode adds: one float64 log-factor per table row."""
        return sum(t.numel() * t.element_size() for t in self.last.values())

    @torch.no_grad()
    def touch(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Brings the given rows (ids per table, repeats allowed) up to date (lazy mode)."""
        if not self.last:
            return
        for name, ids in rows.items():
            if ids.numel() == 0:
                continue
            ids = torch.unique(ids.long())
            missed = self.now - self.last[name][ids]
            stale = missed != 0
            if not bool(stale.any()):
                continue
            ids, missed = ids[stale], missed[stale]
            w = self.weights[name]
            w[ids] = (w[ids].double() * missed.exp().unsqueeze(1)).to(w.dtype)
            self.last[name][ids] = self.now

    @torch.no_grad()
    def advance(self, lr: float) -> None:
        """One optimizer step at learning rate ``lr`` has been taken."""
        if not self.active:
            return
        factor = 1.0 - lr * self.rate
        if factor <= 0:
            raise ValueError(f"embedding L2 {self.rate} x lr {lr} >= 1 would zero the tables")
        if self.mode == "dense":
            for w in self.weights.values():
                w.mul_(factor)
        else:
            self.now += math.log(factor)

    @torch.no_grad()
    def flush(self) -> None:
        """Brings every row up to date; afterwards the weights are what dense mode holds."""
        for name, last in self.last.items():
            missed = self.now - last
            if bool((missed != 0).any()):
                w = self.weights[name]
                w.copy_((w.double() * missed.exp().unsqueeze(1)).to(w.dtype))
            last.fill_(self.now)

    def reset(self) -> None:
        """The weights were replaced by up-to-date ones (a load): nothing is pending."""
        for last in self.last.values():
            last.fill_(self.now)


class EmbeddingRows:
    """Mixin of modules holding embedding rows that the trainer drives under the run's
    protocol: its embedding learning rate (plateau decay included) and decoupled L2.

    After every training step the trainer calls :meth:`step_rows` at the current embedding
    lr (rows a module updates itself, outside autograd's optimizers; fused TorchRec tables
    update inside their backward and do nothing here), then advances ``decay``. It calls
    :meth:`set_weight_decay` once the weights are in place (after fusing, after a rebuild),
    flushes the decay before reading weights whole and resets it after loading weights. The
    module touches the rows it reads in its forward (``decay.touch``) and flushes before its
    own whole-table reads. Fused TorchRec tables and a method's own row tables (the pruning
    family's) thus share one protocol.
    """

    decay: RowDecay | None = None

    def step_rows(self, lr: float) -> None:
        """Updates the rows the last training forward read (nothing by default)."""

    def use_optimizer(self, kind: str) -> None:
        """The run's table optimizer, set before weights load (a module whose rows fbgemm or
        a fixed optimizer steps ignores it)."""

    def decay_weights(self) -> dict[str, torch.Tensor]:
        """The ``[rows, dim]`` weight tensors to decay, by name (live tensors, not copies)."""
        raise NotImplementedError

    def set_weight_decay(self, rate: float, mode: str = "lazy") -> RowDecay:
        """Decoupled L2 ``rate`` on :meth:`decay_weights`; pending decay is flushed first."""
        if self.decay is not None:
            self.decay.flush()
        self.decay = RowDecay(self.decay_weights(), rate, mode)
        return self.decay

    def flush_decay(self) -> None:
        """Brings every row up to date (before a whole-table read)."""
        if self.decay is not None:
            self.decay.flush()
