"""Binary serving on fbgemm's kernel: every decode equals the bit decode (exactly for plane
rows, to one fp16 rounding for decoded rows), ids are range-checked, forged exports are
refused before anything is allocated from them, and an artifact predicts like training."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors import ExportedEmbedding
from compressors.core.base import Stage
from compressors.core.storage import row_bytes
from compressors.precision.binary import (
    BinaryServing,
    binarize,
    binary_export,
    plane_rows,
    unbinarize,
)
from ctr import CompactModel, EmbeddingLayer, build_model, export, features_from_dataset
from datasets.loader import BatchLoader

NAMES = ["a", "b", "c"]
CARDS = [50, 7, 300]
FP16_EPS = 2.0**-11


def _export(dim: int, bits: list[int], scales: str = "row", seed: int = 0) -> ExportedEmbedding:
    gen = torch.Generator().manual_seed(seed)
    parts = [
        binarize(torch.randn(n, dim, generator=gen) * 0.1, b, per_row=scales == "row")
        for n, b in zip(CARDS, bits, strict=True)
    ]
    return binary_export(NAMES, dim, [c for c, _ in parts], [s for _, s in parts], scales)


def _multi_hot(seed: int = 0, batch: int = 64) -> KeyedJaggedTensor:
    """Bags of 0-3 ids per field (empty bags included)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(NAMES) * batch,), generator=gen)
    values = [
        torch.randint(0, n, (int(lengths[f * batch : (f + 1) * batch].sum()),), generator=gen)
        for f, n in enumerate(CARDS)
    ]
    return KeyedJaggedTensor(keys=NAMES, values=torch.cat(values), lengths=lengths)


@pytest.mark.parametrize("scales", ["row", "field"])
@pytest.mark.parametrize("dim", [16, 12])
@pytest.mark.parametrize("bits", [[1, 1, 1], [2, 2, 2], [1, 3, 2]])
def test_every_decode_equals_the_bit_decode(bits, dim, scales):
    exported = _export(dim, bits, scales)
    kjt = _multi_hot()
    slow = BinaryServing(exported, "bits")(kjt)
    # Decoded fp16 rows err by at most half an ulp each: a bag by half an ulp of its |rows|.
    bound = _pooled_abs(exported, kjt) * FP16_EPS + 1e-7
    for decode in ("planes", "auto", "rows"):
        for plane_dtype in ("int2", "int4", "int8"):
            served = BinaryServing(exported, decode, plane_dtype)(kjt)
            assert served.shape == slow.shape == (64, 3, dim)
            if decode == "planes" or max(bits) == 1:
                # Plane rows (and one-plane decoded rows) are exact: float summation order only.
                torch.testing.assert_close(served, slow, rtol=0, atol=1e-6)
            else:
                assert ((served - slow).abs() <= bound).all()


def _pooled_abs(exported: ExportedEmbedding, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """``[B, F, D]`` sums of |row| over each bag (bounds the fp16 rounding of its rows)."""
    lengths = kjt.lengths().view(len(NAMES), -1)
    out = []
    for i, ids in enumerate(torch.split(kjt.values(), kjt.length_per_key())):
        scales = exported.tensors[f"scales.{i}"].float()
        rows = unbinarize(
            exported.tensors[f"codes.{i}"][ids],
            scales[ids] if scales.dim() == 2 else scales,
            exported.config["dim"],
        )
        out.append(torch.segment_reduce(rows.abs(), "sum", lengths=lengths[i]))
    return torch.stack(out, 1)


def test_a_plane_row_decodes_to_exactly_its_scaled_signs():
    weight = torch.randn(40, 16)
    codes, scales = binarize(weight, 3)
    for dtype, bits in (("int2", 2), ("int4", 4), ("int8", 8)):
        rows = plane_rows(codes, scales, dtype)
        assert rows.shape == (40 * 3, row_bytes(16, dtype))
        fused = torch.cat([rows[:, 4:], rows[:, :4]], dim=1).contiguous()
        values = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, bits)
        # Row r·b + p is plane p of row r: s_p · sign_p, so the b rows sum to the decode.
        assert torch.equal(values.view(40, 3, 16).sum(1), unbinarize(codes, scales.float(), 16))


def test_binarize_in_row_chunks_gives_the_whole_fields_codes(monkeypatch):
    """Per-row scales binarize a chunk of rows at a time (a whole field's temporaries are
    ~400 bytes a row): the same codes and scales as one pass; red when a pass over the whole
    field returns."""
    from compressors.precision import binary as binary_mod

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(100, 12, generator=gen)
    whole = binarize(weight, 3)
    padded_rows = []
    real_pad = binary_mod.F.pad

    def pad_recorded(x, *a, **k):
        padded_rows.append(len(x))
        return real_pad(x, *a, **k)

    monkeypatch.setattr(binary_mod, "BINARIZE_CHUNK_ROWS", 7)
    monkeypatch.setattr(binary_mod.F, "pad", pad_recorded)
    chunked = binarize(weight, 3)
    assert padded_rows and max(padded_rows) <= 7
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


def test_decodes_report_what_they_hold():
    exported = _export(16, [1, 2, 1])
    rows = sum(CARDS)
    bits = BinaryServing(exported, "bits")
    assert bits.resident_bytes == exported.nbytes
    auto = BinaryServing(exported, "auto")
    one, two = CARDS[0] + CARDS[2], CARDS[1]
    assert auto.resident_bytes == one * row_bytes(16, "int2") + two * 16 * 2
    planes = BinaryServing(exported, "planes")
    assert planes.resident_bytes == (one + 2 * two) * row_bytes(16, "int2")
    assert BinaryServing(exported, "rows").resident_bytes == rows * 32


def test_out_of_range_ids_are_refused_not_read():
    exported = _export(16, [2, 2, 2])
    kjt = KeyedJaggedTensor(
        keys=NAMES, values=torch.tensor([3, 7, 5]), lengths=torch.tensor([1, 1, 1])
    )
    for decode in ("auto", "planes"):
        with pytest.raises(ValueError, match="'b' has id 7 outside"):
            BinaryServing(exported, decode)(kjt)


def _forged(edit) -> ExportedEmbedding:
    exported = _export(16, [1, 2, 1])
    config, tensors = dict(exported.config), dict(exported.tensors)
    edit(config, tensors)
    return ExportedEmbedding(kind=exported.kind, config=config, tensors=tensors)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c, t: c.update(bits=[1, 8, 1]), "8 planes of dim 16"),
        (lambda c, t: c.update(bits=[1, 2]), "one count per field"),
        (lambda c, t: c.update(bits=[1, True, 1]), "bit-planes, not 1..8"),
        (lambda c, t: c.update(dim=4096), "planes of dim 4096"),
        (lambda c, t: c.update(scales="field"), "field scales"),
        (lambda c, t: t.pop("scales.2"), "differ from the config"),
        (lambda c, t: t.update({"codes.1": t["codes.1"].int()}), "torch.int32"),
        (lambda c, t: t.update({"extra": torch.zeros(1)}), "differ from the config"),
    ],
)
def test_forged_exports_are_refused_before_allocating(edit, message):
    with pytest.raises(ValueError, match=message):
        BinaryServing(_forged(edit))


def test_artifact_predicts_like_the_trained_model(tiny_data, tmp_path):
    torch.manual_seed(0)
    layer = EmbeddingLayer(features_from_dataset(tiny_data), 8, "binary", "10x", init_scale=0.1)
    assert len(set(layer.compressor.field_bits)) > 1  # one- and multi-plane fields
    layer.compressor.run_stage(Stage("binarize", trains=False), None)
    model = build_model("deepfm", layer, 3, hidden=[16]).eval()
    manifest = export(model, tmp_path / "a", dataset=tiny_data)
    # By default the server holds exactly the artifact's bytes (what serve_bytes reports).
    exact = CompactModel.load(tmp_path / "a")
    assert exact.resident_bytes == manifest["embedding"]["serve_bytes"]
    fast = CompactModel.load(tmp_path / "a", serving_options={"binary": {"decode": "auto"}})
    assert fast.resident_bytes > manifest["embedding"]["serve_bytes"]
    batch = next(iter(BatchLoader(tiny_data, "test", batch_size=1000).epoch(0)))
    with torch.no_grad():
        trained = model(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(
        exact(batch.dense_features, batch.sparse_features), trained, rtol=0, atol=1e-5
    )
    # Multi-plane rows are served at fp16: logits agree to fp16 rounding of the embeddings.
    served = fast(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(served, trained, rtol=0, atol=2e-3)
