"""Every method's training forward creates its tensors on the device of the tensors they meet.

A CPU-only machine cannot run CUDA, but PyTorch's ``meta`` device makes the same mistake an
error: an op mixing a meta tensor with a CPU one of more than zero dimensions raises, as CUDA
does ("Expected all tensors to be on the same device"). So the forward, its backward and the
penalty run with the method and the batch on ``meta``; a tensor built without ``device=``
(``torch.arange(n)`` meeting the batch) fails there. 0-dim tensors stay on the host, as
CUDA allows them in any op: the methods' state flags (``frozen``, ``found``), which their
forwards read with ``bool()``.

Meta tensors have shapes but no values: ``torch.unique`` (which batch rows a lookup reads)
runs here as "every value its own row", which keeps every shape a real batch could give;
a forward that reads a value on the host (``int(t)``: BlockMap's id range check) reads 0
there. Each method runs from its first stage's state and, where a later stage forwards
otherwise (binarized codes, a frozen mask, the searched dims), from that state too. The
stage procedures and exports read values throughout and are not covered here
(docs/scale.md, "GPU").
Marked ``cuda``: the same forward on a CUDA device, where torch sees one.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, available, build_compressor
from tests.helpers.features import criteo_features

META = torch.device("meta")
BATCH = 64
DIM = 8

# Forwards that read a value on the host (a sync on CUDA; on meta the value reads as 0):
# BlockMap's id range check, int(lookup.max()) (dnis, mde, autodim after its search).
HOST_READS = {"dnis", "mde", "autodim"}


def _stage(layer, name):
    return next(s for s in layer.stages if s.name == name)


# The state a method's later stages forward from, reached on the CPU without training.
LATER = {
    "autodim": lambda m: m._build_retrain(m.choose()),
    "binary": lambda m: m.run_stage(_stage(m, "binarize"), None),
    "dnis": lambda m: m.prune(),
    "optembed": lambda m: m.frozen.fill_(True),
    "pep": lambda m: (m.mask.copy_(m.all_values() != 0), m.found.fill_(True)),
    "ptq": lambda m: m.run_stage(_stage(m, "quantize"), None),
}


class _ZeroScalars(TorchDispatchMode):
    """A host read of a meta value (``int(t)``, ``bool(t)``) gives 0."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return 0
        return func(*args, **(kwargs or {}))


def _layer(name):
    for budget in ("5x", "2x", "1x"):
        try:
            return build_compressor(name, criteo_features(), DIM, budget)
        except BudgetError:
            continue
    raise AssertionError(f"{name} fits none of 5x, 2x, 1x")


def _batch(features, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, f.cardinality, (BATCH,), generator=g) for f in features])
    lengths = torch.ones(BATCH * len(features), dtype=torch.int32)
    return KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths)


def _to(kjt, device):
    """``kjt`` on ``device`` with its per-key sizes already known (host lists, as a real
    batch's are once the loader has read them)."""
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values().to(device),
        lengths=kjt.lengths().to(device),
        offsets=kjt.offsets().to(device),
        stride=kjt.stride(),
        length_per_key=kjt.length_per_key(),
        offset_per_key=kjt.offset_per_key(),
    )


def _on_meta(module):
    return module._apply(lambda t: t if t.dim() == 0 and not t.is_floating_point() else t.to(META))


@pytest.fixture
def meta_unique(monkeypatch):
    """``torch.unique`` of a meta tensor: every value its own row (the largest batch)."""
    real = torch.unique

    def unique(x, *args, return_inverse=False, **kwargs):
        if not x.is_meta:
            return real(x, *args, return_inverse=return_inverse, **kwargs)
        flat = x.reshape(-1)
        inverse = torch.arange(flat.numel(), device=x.device).view(x.shape)
        return (flat, inverse) if return_inverse else flat

    monkeypatch.setattr(torch, "unique", unique)


@pytest.mark.parametrize("later", [False, True], ids=["first", "later"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", available())
def test_the_forward_makes_its_tensors_on_the_batch_device(name, train, later, meta_unique):
    if later and name not in LATER:
        pytest.skip(f"{name}: one forward for every stage")
    layer = _layer(name)
    if later:
        with torch.no_grad():
            LATER[name](layer)
    layer.train(train)
    kjt = _batch(layer.features)
    with _ZeroScalars() if name in HOST_READS else contextlib.nullcontext():
        out = _on_meta(layer)(_to(kjt, META))
    assert out.device == META and out.shape == (BATCH, len(layer.features), DIM)
    if train:
        (out.sum() + layer.penalty()).backward()
        grads = [p.grad for p in layer.parameters() if p.grad is not None]
        assert all(g.device == META for g in grads)


def test_the_check_goes_red_on_a_host_tensor_in_the_forward(meta_unique, monkeypatch):
    """The check's own mechanism: a forward adding a host tensor fails on meta."""
    layer = _layer("hash")
    forward = type(layer).forward
    monkeypatch.setattr(type(layer), "forward", lambda self, f: forward(self, f) + torch.zeros(DIM))
    with pytest.raises((RuntimeError, NotImplementedError), match="device|meta"):
        _on_meta(layer)(_to(_batch(layer.features), META))


@pytest.mark.cuda
@pytest.mark.parametrize("name", available())
def test_the_forward_on_cuda_matches_the_cpu(name):
    layer = _layer(name)
    layer.eval()
    kjt = _batch(layer.features)
    with torch.no_grad():
        expected = layer(kjt)
        got = layer.to("cuda")(_to(kjt, torch.device("cuda")))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
