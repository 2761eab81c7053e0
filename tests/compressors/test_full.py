"""The `full` backend against an nn.Embedding reference, memory, export and budget."""

import pytest
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors import BudgetError, FeatureSpec, build_compressor, build_serving
from compressors.core.storage import row_bytes

FEATURES = [FeatureSpec("a", 11), FeatureSpec("b", 7), FeatureSpec("tags", 23, multi_hot=True)]
DIM = 8


def _kjt(seed: int = 0, batch: int = 16) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.cat(
        [torch.ones(2 * batch, dtype=torch.long), torch.randint(0, 4, (batch,), generator=g)]
    )
    values = torch.cat(
        [
            torch.randint(0, 11, (batch,), generator=g),
            torch.randint(0, 7, (batch,), generator=g),
            torch.randint(0, 23, (int(lengths[2 * batch :].sum()),), generator=g),
        ]
    )
    return KeyedJaggedTensor(keys=["a", "b", "tags"], values=values, lengths=lengths)


def _reference(weights: list[torch.Tensor], kjt: KeyedJaggedTensor) -> torch.Tensor:
    outs = []
    for w, key in zip(weights, kjt.keys(), strict=True):
        bag = nn.EmbeddingBag.from_pretrained(w, mode="sum")
        jt = kjt[key]
        outs.append(bag(jt.values(), jt.offsets()[:-1]))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("shared", [False, True])
def test_full_equals_embedding_bag_reference(shared):
    layer = build_compressor("full", FEATURES, DIM, "1x", shared=shared)
    weights = layer.tables.weights()
    if shared:
        w = weights["shared"]
        per_field = [w[:11], w[11:18], w[18:]]
    else:
        per_field = [weights["t_a"], weights["t_b"], weights["t_tags"]]
    kjt = _kjt()
    torch.testing.assert_close(layer(kjt), _reference(per_field, kjt), rtol=0, atol=1e-6)


def test_input_keys_in_another_order_are_permuted():
    layer = build_compressor("full", FEATURES, DIM)
    kjt = _kjt()
    shuffled = kjt.permute([2, 0, 1])
    torch.testing.assert_close(layer(shuffled), layer(kjt))
    with pytest.raises(KeyError, match="lacks sparse features"):
        layer(KeyedJaggedTensor(keys=["a"], values=torch.tensor([1]), lengths=torch.tensor([1])))


def test_gradients_reach_only_looked_up_rows():
    layer = build_compressor("full", FEATURES, DIM)
    kjt = KeyedJaggedTensor(
        keys=["a", "b", "tags"], values=torch.tensor([3, 4, 5, 6]), lengths=torch.tensor([1, 1, 2])
    )
    layer(kjt).sum().backward()
    grad = layer.tables.ebc.embedding_bags["t_tags"].weight.grad
    touched = (grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert touched == [5, 6]


def test_memory_is_exact_and_export_holds_those_bytes():
    for storage in ("fp32", "fp16", "int8", "int4", "int2"):
        layer = build_compressor("full", FEATURES, DIM, "1x", storage=storage)
        mem = layer.memory()
        assert mem.serve_bytes == 41 * row_bytes(DIM, storage)
        assert mem.full_bytes == 41 * DIM * 4
        assert mem.train_bytes == 41 * DIM * 4 + 41 * 4  # fp32 rows + rowwise Adagrad state
        assert layer.export().nbytes == mem.serve_bytes
    assert (
        row_bytes(16, "int8") == 20 and row_bytes(16, "int4") == 12 and row_bytes(16, "int2") == 8
    )


def test_budget_is_enforced_with_a_clear_error():
    with pytest.raises(BudgetError, match=r"full: .* needs 1.31 kB but the budget is 656 B"):
        build_compressor("full", FEATURES, DIM, "2x")
    assert build_compressor("full", FEATURES, DIM, "2.5x", storage="int8").memory().ratio > 2.5
    with pytest.raises(BudgetError, match="at int8 needs 492 B"):  # int8 rows: 8 + 4 bytes
        build_compressor("full", FEATURES, DIM, "3x", storage="int8")


@pytest.mark.parametrize(
    ("storage", "tolerance"), [("fp32", 0.0), ("fp16", 1e-3), ("int8", 2e-3), ("int4", 4e-2)]
)
def test_serving_kernel_matches_training_lookup(storage, tolerance):
    layer = build_compressor("full", FEATURES, DIM, "1x", storage=storage, shared=True)
    kjt = _kjt(3)
    served = build_serving(layer.export())(kjt)
    # Bags sum at most 3 rows of |w| <= 0.01: errors stay within row-wise quantisation steps.
    torch.testing.assert_close(served, layer(kjt).detach(), rtol=0, atol=tolerance + 1e-7)


def test_fused_tables_keep_weights_and_update_in_backward():
    layer = build_compressor("full", FEATURES, DIM)
    kjt = _kjt()
    before = layer(kjt).detach()
    layer.tables.fuse("rowwise_adagrad", lr=0.1)
    torch.testing.assert_close(layer(kjt).detach(), before)
    layer(kjt).sum().backward()  # the fused optimizer steps inside backward
    assert not torch.allclose(layer(kjt).detach(), before)


def test_unknown_options_and_methods_are_rejected():
    with pytest.raises(TypeError, match="has no options \\['dims'\\]"):
        build_compressor("full", FEATURES, DIM, dims=3)
    with pytest.raises(ValueError, match="unknown compressor 'nope'"):
        build_compressor("nope", FEATURES, DIM)
    with pytest.raises(ValueError, match="unknown storage dtype"):
        build_compressor("full", FEATURES, DIM, storage="int3")
