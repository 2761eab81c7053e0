"""core.optim.Adam: sparse gradients applied as the dense Adam step they stand for (every entry
moves: coupled L2 and the moments), state torch's own."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from compressors.core.optim import Adam


def _pair(rows: int = 300, dim: int = 8) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    torch.manual_seed(0)
    start = torch.full((rows, dim), -15.0) + torch.randn(rows, dim)
    return torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())


def _steps(dense, sparse, opt_dense, opt_sparse, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, d = dense.shape
    for _ in range(steps):
        rows = torch.randint(0, n, (n // 4,), generator=gen).unique()
        w = torch.randn(len(rows), d, generator=gen)
        opt_dense.zero_grad()
        opt_sparse.zero_grad()
        (torch.sigmoid(dense[rows]) * w).sum().backward()
        (torch.sigmoid(F.embedding(rows, sparse, sparse=True)) * w).sum().backward()
        assert sparse.grad.is_sparse and not dense.grad.is_sparse
        opt_dense.step()
        opt_sparse.step()


def test_sparse_gradients_step_as_dense_adam_every_entry_included():
    dense, sparse = _pair()
    opt_dense = torch.optim.Adam([dense], lr=0.1, weight_decay=1e-5)
    opt_sparse = Adam([sparse], lr=0.1, weight_decay=1e-5)
    start = sparse.detach().clone()
    _steps(dense, sparse, opt_dense, opt_sparse, steps=1)
    # One step: entries no batch read moved too (coupled L2 through Adam's normalised step:
    # by lr), as in dense Adam; a lazy Adam would leave them.
    read = sparse.grad.coalesce().indices()[0]
    unread = torch.ones(len(start), dtype=torch.bool)
    unread[read] = False
    assert unread.any()
    torch.testing.assert_close(sparse[unread] - start[unread], torch.full_like(start[unread], 0.1))
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    _steps(dense, sparse, opt_dense, opt_sparse, steps=20, seed=2)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(opt_sparse.state[sparse][key], opt_dense.state[dense][key])
    # The gradient the step read is zeros again but at no row; the parameter keeps its
    # sparse gradient, as an optimizer leaves gradients.
    assert not opt_sparse._dense_grads[id(sparse)].any() and sparse.grad.is_sparse


def test_state_round_trips_and_dense_groups_are_torchs():
    dense, sparse = _pair()
    opt = Adam([sparse], lr=0.1, weight_decay=1e-5)
    _steps(dense, sparse, torch.optim.Adam([dense], lr=0.1), opt, steps=3)
    resumed = torch.nn.Parameter(sparse.detach().clone())
    again = Adam([resumed], lr=0.1, weight_decay=1e-5)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint holds it
    twin = torch.nn.Parameter(sparse.detach().clone())
    _steps(dense, sparse, torch.optim.Adam([twin], lr=0.1), opt, steps=2, seed=5)
    _steps(twin, resumed, torch.optim.Adam([dense], lr=0.1), again, steps=2, seed=5)
    torch.testing.assert_close(resumed, sparse, rtol=0, atol=0)
    # Without sparse gradients it is torch's Adam, bit for bit.
    a, b = _pair()
    opt_a = torch.optim.Adam([a], lr=0.1, weight_decay=1e-5)
    opt_b = Adam([b], lr=0.1, weight_decay=1e-5)
    for _ in range(3):
        for p, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            torch.sigmoid(p[::3]).sum().backward()
            o.step()
    assert torch.equal(a, b) and not opt_b.param_groups[0]["fused"]
