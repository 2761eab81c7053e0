"""Every model of the zoo: forward shape, backward reaches every parameter, learns a toy task."""

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import FeatureSpec
from ctr import EmbeddingLayer, build_model
from ctr.models import MODELS
from ctr.models.layers import fm_interaction, pairwise_dots

FEATURES = [FeatureSpec(f"f{i}", 30 + i) for i in range(5)]
SMALL = {
    "wide_deep": {"hidden": [16]},
    "deepfm": {"hidden": [16]},
    "dcnv2": {"hidden": [16], "cross_layers": 2},
    "dlrm": {"bottom": [8], "top": [16]},
}


def _batch(batch: int = 32, num_dense: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, f.cardinality, (batch,), generator=g) for f in FEATURES])
    kjt = KeyedJaggedTensor(
        keys=[f.name for f in FEATURES],
        values=values,
        lengths=torch.ones(len(FEATURES) * batch, dtype=torch.long),
    )
    return torch.randn(batch, num_dense, generator=g), kjt


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_dense", [3, 0])
def test_forward_backward(name, num_dense):
    torch.manual_seed(0)
    model = build_model(name, EmbeddingLayer(FEATURES, 8), num_dense, **SMALL.get(name, {}))
    dense, kjt = _batch(num_dense=num_dense)
    logits = model(dense, kjt)
    assert logits.shape == (32,) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones(32)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
    assert SMALL.get(name, {}).items() <= model.options.items()  # rebuildable from options


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_fit_a_planted_rule(name):
    # Label = whether field f0's id is even: every model must learn it from the embedding.
    torch.manual_seed(0)
    model = build_model(name, EmbeddingLayer(FEATURES, 8, init_scale=0.1), 2, **SMALL.get(name, {}))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(60):
        dense, kjt = _batch(128, 2, seed=step)
        labels = (kjt["f0"].values() % 2 == 0).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.45, f"{name} did not learn (loss {loss.item():.3f})"


def test_fm_interaction_equals_explicit_pairs():
    emb = torch.randn(4, 5, 3)
    explicit = sum((emb[:, i] * emb[:, j]).sum(1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(fm_interaction(emb), explicit)


def test_pairwise_dots_upper_triangle():
    v = torch.randn(2, 4, 3)
    dots = pairwise_dots(v)
    assert dots.shape == (2, 6)
    torch.testing.assert_close(dots[:, 0], (v[:, 0] * v[:, 1]).sum(1))
    torch.testing.assert_close(dots[:, -1], (v[:, 2] * v[:, 3]).sum(1))


def test_unknown_model_and_bad_options():
    layer = EmbeddingLayer(FEATURES, 8)
    with pytest.raises(ValueError, match="unknown model 'xgb'"):
        build_model("xgb", layer, 0)
    with pytest.raises(TypeError, match="model 'deepfm'"):
        build_model("deepfm", layer, 0, depth=3)


def test_deepfm_textbook_first_order_reads_a_counted_column():
    """first_order='value': the last column of each row is the value's first-order weight,
    stored (and counted) by the compressed layer itself; FM and MLP use the other columns."""
    features = [FeatureSpec("a", 50), FeatureSpec("b", 30)]
    layer = EmbeddingLayer(features, 9, "hash", "4x")
    model = build_model("deepfm", layer, 2, hidden=[8], first_order="value")
    assert model.deep[0].in_features == 2 * 8 + 2
    kjt = KeyedJaggedTensor(
        keys=["a", "b"], values=torch.tensor([3, 4, 5, 6]), lengths=torch.ones(4, dtype=torch.int64)
    )
    dense = torch.randn(2, 2)
    emb = layer(kjt)
    with torch.no_grad():
        model.deep[-1].weight.zero_()
        model.deep[-1].bias.zero_()
        expected = emb[..., -1].sum(1) + model.linear.offset(dense) + fm_interaction(emb[..., :-1])
        torch.testing.assert_close(model(dense, kjt), expected)
    # Its bytes are the layer's: nothing outside the compressor holds a per-value weight.
    assert (
        sum(p.numel() for n, p in model.named_parameters() if "linear" in n) == 4
    )  # dense 2+1, bias
    with pytest.raises(ValueError, match="first_order must be one of"):
        build_model("deepfm", layer, 2, first_order="row")
