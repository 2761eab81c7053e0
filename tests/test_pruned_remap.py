"""The remap of a row-pruned field: the rank bitmap maps every id exactly as the array remap
does, costs what serve_bytes counts, is the form chosen wherever it is smaller, and a forged
one is refused whole before it serves."""

from __future__ import annotations

import pytest
import torch

from compressors.pruning.common import (
    FieldPlan,
    RankBitmap,
    RemapMap,
    bitmap_bytes,
    build_bitmap,
    build_remap,
    export_pruned,
    remap_bytes,
    remap_form,
)


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
    assert bitmap.bits.numel() + 4 * bitmap.ranks.numel() == bitmap_bytes(rows)


def test_the_smaller_remap_is_chosen_and_counted():
    assert remap_form(6, 3) == "array" and remap_form(7, 3) == "bitmap"  # 12 vs 12, 12 vs 14
    assert bitmap_bytes(64_000) * 10 < remap_bytes(64_000, 100)  # 1.5 vs 16 bits an id
    plan = FieldPlan("C1", 1000, "rows", dim=4, kept=10)
    assert plan.serve_bytes("fp32") == 10 * 16 + bitmap_bytes(1000)
    keep = torch.zeros(1000, dtype=torch.bool)
    keep[::100] = True
    exported = export_pruned(
        "optembed", 4, [plan], "fp32", lambda f: torch.randn(1000, 4), lambda f: keep
    )
    stored = sum(t.numel() * t.element_size() for t in exported.tensors.values())
    assert stored == plan.serve_bytes("fp32")
    assert set(exported.tensors) == {"table.t_C1", "index_map.bits.C1", "index_map.ranks.C1"}


def _forged(edit) -> tuple[dict, dict]:
    keep = torch.arange(300) % 3 == 0
    remap = RemapMap(["C.1"], {}, {"C.1": build_bitmap(keep)})  # a dotted name works too
    config, tensors = remap.to_config(), {k: v.clone() for k, v in remap.tensors().items()}
    edit(config, tensors)
    return config, tensors


def _flip_rank(config, tensors):
    tensors["ranks.C.1"][2] += 1


def _set_padding(config, tensors):
    tensors["bits.C.1"][-1] |= 0x80


def _wrong_target(config, tensors):
    config["bitmaps"]["C.1"]["pruned_to"] = 7


def _short_bits(config, tensors):
    tensors["bits.C.1"] = tensors["bits.C.1"][:-8]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_flip_rank, "block counts do not match"),
        (_set_padding, "padding bits are set"),
        (_wrong_target, "pruned ids map to 7"),
        (_short_bits, "expected uint8"),
    ],
)
def test_a_forged_bitmap_is_refused_in_one_line(edit, message):
    config, tensors = _forged(lambda c, t: None)
    RemapMap.from_config(config, tensors)  # the untouched one loads
    config, tensors = _forged(edit)
    with pytest.raises(ValueError, match=message) as info:
        RemapMap.from_config(config, tensors)
    assert "\n" not in str(info.value) and "'C.1'" in str(info.value)


def test_rank_bitmap_round_trips_through_its_config():
    keep = torch.rand(500, generator=torch.Generator().manual_seed(1)) < 0.3
    built = build_bitmap(keep, oov=True)
    again = RankBitmap.from_config("f", built.to_config(), built.bits, built.ranks)
    ids = torch.arange(500)
    assert torch.equal(again(ids), built(ids))
    assert int(again(ids)[~keep][0]) == int(keep.sum())  # pruned ids read the OOV row
