"""The index structures of pruned fields: the rank bitmap maps every id exactly as the array
remap does, costs what serve_bytes counts, is the form chosen wherever it is smaller, and a
forged one is refused whole before it serves; CSR row pointers as block bases + 16-bit
offsets serve exactly as int32 pointers did (which older exports still use)."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from compressors.core.csr import pointer_bytes
from compressors.pruning.bytes import FieldPlan, bitmap_bytes, csr_bytes, remap_bytes, remap_form
from compressors.pruning.remap import RankBitmap, RemapMap, build_bitmap, build_remap
from compressors.pruning.serving import SparseFields, export_pruned, pack_csr


@pytest.mark.parametrize("rows", [1, 7, 63, 64, 65, 1000, 40_000])
@pytest.mark.parametrize("share", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("oov", [False, True])
def test_bitmap_maps_every_id_as_the_array_remap(rows, share, oov):
    gen = torch.Generator().manual_seed(rows)
    keep = torch.rand(rows, generator=gen) < share
    array = build_remap(keep, oov).long()
    bitmap = build_bitmap(keep, oov)
    assert torch.equal(bitmap(torch.arange(rows)), array)
    ids = torch.randint(0, rows, (4096,), generator=gen)
    assert torch.equal(bitmap(ids), array[ids])
    held = bitmap.bits.numel() + bitmap.counts.numel() + 4 * bitmap.ranks.numel()
    assert held == bitmap_bytes(rows)


def test_the_smaller_remap_is_chosen_and_counted():
    assert remap_form(10, 3) == "array" and remap_form(11, 3) == "bitmap"  # 20 vs 20, 20 vs 22
    assert bitmap_bytes(64_000) * 6.4 == remap_bytes(64_000, 100)  # 2.5 vs 16 bits an id
    plan = FieldPlan("C1", 1000, "rows", dim=4, kept=10)
    assert plan.serve_bytes("fp32") == 10 * 16 + bitmap_bytes(1000)
    keep = torch.zeros(1000, dtype=torch.bool)
    keep[::100] = True
    exported = export_pruned(
        "optembed", 4, [plan], "fp32", lambda f: torch.randn(1000, 4), lambda f: keep
    )
    stored = sum(t.numel() * t.element_size() for t in exported.tensors.values())
    assert stored == plan.serve_bytes("fp32")
    assert set(exported.tensors) == {
        "table.t_C1",
        "index_map.bits.C1",
        "index_map.counts.C1",
        "index_map.ranks.C1",
    }


def _forged(edit) -> tuple[dict, dict]:
    keep = torch.arange(300) % 3 == 0
    remap = RemapMap(["C.1"], {}, {"C.1": build_bitmap(keep)})  # a dotted name works too
    config, tensors = remap.to_config(), {k: v.clone() for k, v in remap.tensors().items()}
    edit(config, tensors)
    return config, tensors


def _flip_rank(config, tensors):
    tensors["ranks.C.1"][2] += 1


def _flip_count(config, tensors):
    tensors["counts.C.1"][3] += 1


def _set_padding(config, tensors):
    tensors["bits.C.1"][-1] |= 0x80


def _wrong_target(config, tensors):
    config["bitmaps"]["C.1"]["pruned_to"] = 7


def _short_bits(config, tensors):
    tensors["bits.C.1"] = tensors["bits.C.1"][:-8]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_flip_rank, "counts do not match"),
        (_flip_count, "counts do not match"),
        (_set_padding, "padding bits are set"),
        (_wrong_target, "pruned ids map to 7"),
        (_short_bits, "expected torch.uint8"),
    ],
)
def test_a_forged_bitmap_is_refused_in_one_line(edit, message):
    config, tensors = _forged(lambda c, t: None)
    RemapMap.from_config(config, tensors)  # the untouched one loads
    config, tensors = _forged(edit)
    with pytest.raises(ValueError, match=message) as info:
        RemapMap.from_config(config, tensors)
    assert "\n" not in str(info.value) and "'C.1'" in str(info.value)


def test_one_map_serves_arrays_bitmaps_and_plain_fields_at_once():
    # Fields of every kind in one batch: each id maps as its own field's remap says, and an
    # id beyond its field is refused (in the concatenation it would read the next field's).
    gen = torch.Generator().manual_seed(2)
    keeps = {
        "a": torch.rand(5, generator=gen) < 0.5,  # small: an int16 array
        "b": torch.rand(1000, generator=gen) < 0.2,  # a bitmap
        "c": torch.rand(70_000, generator=gen) < 0.9,  # an int32 array (forced below)
        "d": torch.rand(300, generator=gen) < 0.1,  # a bitmap with an OOV row
    }
    arrays = {"a": build_remap(keeps["a"]), "c": build_remap(keeps["c"]).to(torch.int32)}
    bitmaps = {"b": build_bitmap(keeps["b"]), "d": build_bitmap(keeps["d"], oov=True)}
    names = ["a", "plain", "b", "c", "d"]
    remap = RemapMap(names, arrays, bitmaps)
    reference = {**arrays, "b": build_remap(keeps["b"]), "d": build_remap(keeps["d"], True)}
    sizes = {"a": 5, "plain": 50, "b": 1000, "c": 70_000, "d": 300}
    ids = {f: torch.randint(0, n, (64,), generator=gen) for f, n in sizes.items()}
    kjt = KeyedJaggedTensor(
        keys=names,
        values=torch.cat([ids[f] for f in names]),
        lengths=torch.ones(64 * len(names), dtype=torch.int64),
    )
    out = remap(kjt).to_dict()
    for f in names:
        want = ids[f] if f == "plain" else reference[f].long()[ids[f]]
        assert torch.equal(out[f].values(), want), f
    held = sum(t.numel() * t.element_size() for t in remap.tensors().values())
    assert held == sum(t.numel() * t.element_size() for t in arrays.values()) + sum(
        bitmap_bytes(sizes[f]) for f in bitmaps
    )
    again = RemapMap.from_config(remap.to_config(), remap.tensors())
    assert torch.equal(again(kjt).values(), remap(kjt).values())
    bad = torch.cat([ids[f] for f in names])
    bad[64 * 2 + 3] = 1000  # field b has ids 0..999
    with pytest.raises(ValueError, match=r"field 'b': id 1000 outside \[0, 1000\)"):
        remap(KeyedJaggedTensor(keys=names, values=bad, lengths=kjt.lengths()))
    bad[64 * 2 + 3] = 2**32 + 7  # would wrap to 7 in the int32 arithmetic: refused first
    with pytest.raises(ValueError, match=r"field 'b': id 4294967303 outside"):
        remap(KeyedJaggedTensor(keys=names, values=bad, lengths=kjt.lengths()))


def test_rank_bitmap_round_trips_through_its_config():
    keep = torch.rand(500, generator=torch.Generator().manual_seed(1)) < 0.3
    built = build_bitmap(keep, oov=True)
    again = RankBitmap.from_config("f", built.to_config(), built.bits, built.counts, built.ranks)
    ids = torch.arange(500)
    assert torch.equal(again(ids), built(ids))
    assert int(again(ids)[~keep][0]) == int(keep.sum())  # pruned ids read the OOV row


@pytest.mark.parametrize(("dim", "density"), [(16, 0.3), (600, 1.0), (1100, 0.3)])
def test_csr_row_pointers_are_block_bases_and_16_bit_offsets(dim, density):
    gen = torch.Generator().manual_seed(dim)
    rows = 700 if dim == 16 else 70
    keep = torch.rand(rows, dim, generator=gen) < density
    values = torch.randn(rows, dim, generator=gen) * keep
    values[5:8] = 0  # empty rows
    packed = pack_csr(values, "fp32")
    nnz = int((values != 0).sum())
    stored = sum(t.numel() * t.element_size() for t in packed.values())
    assert stored == csr_bytes(rows, nnz, dim, "fp32")
    if dim <= 1040:  # 63 rows of dim entries fit 16 bits: bases + offsets, 2.06 bytes a row
        assert set(packed) == {"cols", "values", "base", "offsets"}
        blocks = -(-(rows + 1) // 64)
        assert pointer_bytes(rows, dim) == (rows + 1) * 2 + blocks * 4
        if dim == 600:  # offsets past 32767 wrap in int16 and are read back unsigned
            assert int(packed["offsets"].min()) < 0
    else:  # 63 x 1100 entries overflow 16 bits: int32 pointers
        assert set(packed) == {"cols", "values", "ptr"}
    plan = FieldPlan("C1", rows, "csr", dim=dim, nnz=nnz)
    served = SparseFields([plan], dim, {f"csr.C1.{k}": v for k, v in packed.items()})
    ids = torch.randint(0, rows, (256,), generator=gen)
    kjt = KeyedJaggedTensor(keys=["C1"], values=ids, lengths=torch.ones(256, dtype=torch.int64))
    torch.testing.assert_close(served(kjt)[:, 0], values[ids])


def test_csr_exports_with_int32_pointers_still_serve():
    values = torch.randn(300, 8) * (torch.rand(300, 8) < 0.2)
    nz = values != 0
    ptr = torch.zeros(301, dtype=torch.int64)
    ptr[1:] = torch.cumsum(nz.sum(1), 0)
    rows, cols = nz.nonzero(as_tuple=True)
    older = {"values": values[rows, cols], "cols": cols.to(torch.uint8), "ptr": ptr.int()}
    plan = FieldPlan("C1", 300, "csr", dim=8, nnz=len(rows))
    served = SparseFields([plan], 8, {f"csr.C1.{k}": v for k, v in older.items()})
    ids = torch.arange(300)
    kjt = KeyedJaggedTensor(keys=["C1"], values=ids, lengths=torch.ones(300, dtype=torch.int64))
    torch.testing.assert_close(served(kjt)[:, 0], values)
