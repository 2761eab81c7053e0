"""Binary serving on fbgemm's int2 kernel equals the bit-decoding path."""

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import ExportedEmbedding
from compressors.core.layout import OffsetMap
from compressors.core.storage import unpack_rows
from compressors.precision.binary import KIND, BinaryServing, binarize, planes_as_int2


def _exported(cards, dim, bits):
    torch.manual_seed(0)
    parts = [binarize(torch.randn(n, dim) * 0.1, bits) for n in cards]
    names = [f"C{i}" for i in range(len(cards))]
    return names, ExportedEmbedding(
        kind=KIND,
        config={
            "method": "binary",
            "dim": dim,
            "num_fields": len(cards),
            "bits": bits,
            "index_map": OffsetMap(names, [sum(cards[:i]) for i in range(len(cards))]).to_config(),
        },
        tensors={
            "codes": torch.cat([c for c, _ in parts]),
            "scales": torch.cat([s for _, s in parts]),
        },
    )


@pytest.mark.parametrize(("bits", "dim"), [(1, 16), (3, 16), (2, 8), (1, 12)])
def test_int2_planes_serve_exactly_what_the_bits_decode(bits, dim):
    cards = [50, 70, 30]
    names, exported = _exported(cards, dim, bits)
    fast, slow = BinaryServing(exported), BinaryServing(exported, decode="bits")
    assert fast.decode == ("int2" if dim % 8 == 0 else "bits")
    lengths = torch.randint(0, 4, (len(cards) * 64,))
    values = torch.cat(
        [
            torch.randint(0, n, (int(lengths[i * 64 : (i + 1) * 64].sum()),))
            for i, n in enumerate(cards)
        ]
    )
    kjt = KeyedJaggedTensor(keys=names, values=values, lengths=lengths)
    torch.testing.assert_close(fast(kjt), slow(kjt), rtol=0, atol=1e-6)


def test_each_int2_plane_row_is_exactly_the_scaled_signs():
    codes, scales = binarize(torch.randn(20, 16), 2)
    rows = unpack_rows(planes_as_int2(codes, scales, 16), "int2").view(2, 20, 16)
    signs = ((codes.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(
        2
    ).float() * 2 - 1
    for k in range(2):
        expected = signs[:, k] * scales[:, k].float().unsqueeze(1)
        assert torch.equal(rows[k], expected)
