"""Every method's training forward creates its tensors on the device of the tensors they meet.

A CPU-only machine cannot run CUDA, but PyTorch's ``meta`` device makes the same mistake an
error: an op mixing a meta tensor with a CPU one of more than zero dimensions raises, as CUDA
does ("Expected all tensors to be on the same device"). So the forward, its backward and the
penalty run with the method and the batch on ``meta``; a tensor built without ``device=``
(``torch.arange(n)`` meeting the batch) fails there. Where meta is laxer than CUDA (it lets
a host tensor be indexed by meta indices) a dispatch mode applies CUDA's rule. 0-dim
tensors stay on the host, as CUDA allows them in any op: the methods' state flags
(``frozen``, ``found``), which their forwards read with ``bool()``.

Meta tensors have shapes but no values: ``torch.unique`` (which batch rows a lookup reads)
runs here as "every value its own row", and ``torch.nonzero`` as "every element non-zero",
which keeps every shape a real batch could give;
a forward that reads a value on the host (``int(t)``: BlockMap's id range check) reads 0
there. Each method runs from its first stage's state and, where a later stage forwards
otherwise (binarized codes, a frozen mask, the searched dims), from that state too. The
stage procedures and exports read values throughout and are not covered here
(docs/scale.md, "GPU").
Marked ``cuda``: the same forward on a CUDA device, where torch sees one.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx.experimental._config as fx_config
from torch.utils import _pytree as pytree
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


aten = torch.ops.aten
# Ops that move data between devices on purpose.
_MOVES = {aten._to_copy.default, aten.copy_.default, aten._local_scalar_dense.default}
# CUDA indexes a device tensor with host indices (copying them over); not the reverse.
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class _CudaDeviceRules(TorchDispatchMode):
    """CUDA's device rule, enforced where meta is laxer: an op meeting a meta tensor may
    take a host tensor only as a 0-dim scalar (or as indices into a meta tensor). Meta
    itself lets a host tensor be indexed by meta indices, which CUDA refuses. With
    ``zero_scalars`` a host read of a meta value (``int(t)``, ``bool(t)``) gives 0."""

    def __init__(self, zero_scalars: bool) -> None:
        super().__init__()
        self.zero_scalars = zero_scalars

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].is_meta and self.zero_scalars:
            return 0
        if func not in _MOVES:
            leaves = pytree.tree_leaves((args, kwargs))
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            if func in _INDEXING and args[0].is_meta:  # (self, indices[, values, ...])
                tensors = [args[0], *[t for t in args[2:3] if isinstance(t, torch.Tensor)]]
            host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if host and any(t.is_meta for t in tensors):
                raise RuntimeError(
                    f"{func}: a host tensor {tuple(host[0].shape)} meets device (meta) "
                    "tensors; on CUDA: Expected all tensors to be on the same device"
                )
        return func(*args, **kwargs)


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
    # torch.nonzero (mgqe's code tiers) likewise: every element non-zero, meta's own stand-in.
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


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
    layer, kjt = _on_meta(layer), _to(kjt, META)
    with _CudaDeviceRules(zero_scalars=name in HOST_READS):
        out = layer(kjt)
    assert out.device == META and out.shape == (BATCH, len(layer.features), DIM)
    if train:
        (out.sum() + layer.penalty()).backward()
        grads = [p.grad for p in layer.parameters() if p.grad is not None]
        assert all(g.device == META for g in grads)


@pytest.mark.parametrize("mistake", ["added", "indexed"])
def test_the_check_goes_red_on_a_host_tensor_in_the_forward(mistake, meta_unique, monkeypatch):
    """The check's own mechanism: a forward adding a host tensor, or indexing one with the
    batch's indices (which meta alone lets pass), fails."""
    layer = _layer("hash")
    forward = type(layer).forward

    def wrong(self, f):
        out = forward(self, f)
        if mistake == "added":
            return out + torch.zeros(DIM)
        return out + torch.ones(DIM)[torch.zeros(DIM, dtype=torch.long, device=out.device)]

    monkeypatch.setattr(type(layer), "forward", wrong)
    layer, kjt = _on_meta(layer), _to(_batch(layer.features), META)
    with pytest.raises(RuntimeError, match="same device"), _CudaDeviceRules(False):
        layer(kjt)


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
