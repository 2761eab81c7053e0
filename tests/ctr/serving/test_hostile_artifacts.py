"""Tampered or hostile artifacts and datasets: each refused in one line, nothing large allocated.

The loads run in one child process that reports its peak-RSS growth per case, so an
allocation made from a forged size shows however much memory earlier tests used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from compressors.core.base import Stage
from ctr import EmbeddingLayer, build_model, export, features_from_dataset
from ctr.serving.manifest import MANIFEST_FILE, TENSORS_FILE
from datasets.prepared import VOCAB_FILE, DatasetMeta, PreparedDataError
from tests.helpers import ROOT

ALLOWED_GROWTH_MB = 200

CHILD = """
import json, resource, sys
from ctr.serving.compact import CompactModel
out = {}
for case in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        CompactModel.load(case).raw_encoder  # what `ctr serve` loads: the vocabulary too
        message = None
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    out[case] = [message, grown]
print(json.dumps(out))
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_manifest(art: Path, edit) -> None:
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    edit(manifest)
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))


def _emptied_file_list(m):
    m["files"] = {}


def _path_traversal(m):
    m["files"]["../../etc/passwd"] = "0" * 64


def _oversized_rows(m):
    m["embedding"]["config"]["tables"][0]["rows"] = 10**8


def _oversized_hidden(m):
    m["model"]["options"]["hidden"] = [10**6, 10**6]


def _oversized_num_dense(m):
    m["model"]["num_dense"] = 10**9


def _flipped_byte(art: Path) -> None:
    raw = bytearray((art / TENSORS_FILE).read_bytes())
    raw[-5] ^= 0xFF
    (art / TENSORS_FILE).write_bytes(bytes(raw))


def _forged_tensors(art: Path, edit) -> None:
    """Stored tensors rewritten by ``edit`` (returns the keys it changed), with the manifest's
    shapes and checksum forged to match."""
    tensors = load_file(str(art / TENSORS_FILE))
    changed = edit(tensors)
    save_file(tensors, str(art / TENSORS_FILE))

    def forge(m):
        for k in changed:
            m["tensors"][k]["shape"] = list(tensors[k].shape)
        m["files"][TENSORS_FILE] = _sha(art / TENSORS_FILE)

    _edit_manifest(art, forge)


def _swapped_tensors(art: Path) -> None:
    """Two weights of different shapes swapped, manifest and checksum forged to match."""

    def swap(tensors):
        a, b = "model.deep.0.weight", "model.deep.2.weight"
        assert tensors[a].shape != tensors[b].shape
        tensors[a], tensors[b] = tensors[b], tensors[a]
        return (a, b)

    _forged_tensors(art, swap)


def _deep_manifest(art: Path) -> None:
    (art / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)


def _huge_manifest(art: Path) -> None:
    """A valid manifest padded to 128 MB with whitespace: read whole, it would be served."""
    with open(art / MANIFEST_FILE, "ab") as f:
        for _ in range(128):
            f.write(b" " * (1 << 20))


def _vocab_bomb(art: Path) -> None:
    """30M dictionary-encoded rows in a small vocab.parquet, checksum forged to match."""
    path = art / VOCAB_FILE
    schema = pq.read_schema(path)
    one = pa.DictionaryArray.from_arrays(pa.array(np.zeros(1 << 20, np.int32)), pa.array(["C1"]))
    ids = pa.array(np.ones(1 << 20, np.int32))
    with pq.ParquetWriter(path, schema) as writer:
        for _ in range(30):
            writer.write_table(pa.table([one, one, ids], schema=schema))
    _edit_manifest(art, lambda m: m["files"].update({VOCAB_FILE: _sha(path)}))


def _vocab_symlink(art: Path) -> None:
    """vocab.parquet a link to a file outside the artifact (same bytes, same checksum)."""
    outside = art.parent / f"{art.name}-outside.parquet"
    shutil.copyfile(art / VOCAB_FILE, outside)
    (art / VOCAB_FILE).unlink()
    (art / VOCAB_FILE).symlink_to(outside)


CASES = {
    "deep_manifest": (_deep_manifest, f"{MANIFEST_FILE}: JSON nested too deeply"),
    "huge_manifest": (_huge_manifest, "a manifest is at most"),
    "vocab_bomb": (_vocab_bomb, "more than the"),
    "vocab_symlink": (_vocab_symlink, "symbolic link"),
    "emptied_file_list": (lambda a: _edit_manifest(a, _emptied_file_list), "lists no checksum"),
    "path_traversal": (lambda a: _edit_manifest(a, _path_traversal), "an artifact holds only"),
    "flipped_byte": (_flipped_byte, "checksum mismatch"),
    "oversized_rows": (lambda a: _edit_manifest(a, _oversized_rows), "need"),
    "oversized_hidden": (lambda a: _edit_manifest(a, _oversized_hidden), "other tensors"),
    "oversized_num_dense": (lambda a: _edit_manifest(a, _oversized_num_dense), "num_dense"),
    "swapped_tensors": (_swapped_tensors, "other tensors than stored"),
}


def _forged_planes(m):
    m["embedding"]["config"]["bits"][0] = 8


def _forged_binary_dim(m):
    m["embedding"]["config"]["dim"] = 4096


def _resized_codes(art: Path) -> None:
    """A field's codes stored with more planes than its config says, checksums forged."""

    def resize(tensors):
        key = "embedding.codes.0"
        tensors[key] = tensors[key].repeat(1, 8, 1)
        return (key,)

    _forged_tensors(art, resize)


BINARY_CASES = {
    "forged_planes": (lambda a: _edit_manifest(a, _forged_planes), "planes of dim"),
    "forged_binary_dim": (lambda a: _edit_manifest(a, _forged_binary_dim), "planes of dim 4096"),
    "resized_codes": (_resized_codes, "stores codes torch.uint8"),
}


def _check_refused(clean: Path, tmp_path: Path, cases: dict) -> None:
    paths = []
    for name, (tamper, _) in cases.items():
        shutil.copytree(clean, tmp_path / name)
        tamper(tmp_path / name)
        paths.append(str(tmp_path / name))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(clean), *paths],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    results = json.loads(child.stdout.splitlines()[-1])
    assert results.pop(str(clean))[0] is None  # the untampered artifact loads
    wrong = {}  # every case's verdict at once: one broken check names all it lets through
    for name, (_, expected) in cases.items():
        message, grown_mb = results[str(tmp_path / name)]
        if message is None:
            wrong[name] = "loaded"
        elif not (message.startswith("ArtifactError: ") and expected in message):
            wrong[name] = message
        elif "\n" in message:
            wrong[name] = f"several lines: {message}"
        elif grown_mb >= ALLOWED_GROWTH_MB:
            wrong[name] = f"grew {grown_mb:.0f} MB"
    assert not wrong, wrong


def test_hostile_artifacts_are_refused_without_allocating(tiny_data, tmp_path):
    torch.manual_seed(0)
    layer = EmbeddingLayer(features_from_dataset(tiny_data), 8, "full", "1x")
    model = build_model("deepfm", layer, 3, hidden=[16, 8]).eval()
    clean = tmp_path / "clean"
    export(model, clean, dataset=tiny_data)
    _check_refused(clean, tmp_path, CASES)


def test_hostile_binary_artifacts_are_refused(tiny_data, tmp_path):
    """Binary serving re-lays its codes at load: the codes' shapes are checked against the
    config before any table is built from them."""
    torch.manual_seed(0)
    layer = EmbeddingLayer(features_from_dataset(tiny_data), 8, "binary", "10x")
    layer.compressor.run_stage(Stage("binarize", trains=False), None)
    model = build_model("deepfm", layer, 3, hidden=[16, 8]).eval()
    clean = tmp_path / "clean"
    export(model, clean, dataset=tiny_data)
    _check_refused(clean, tmp_path, BINARY_CASES)


def test_dataset_shard_paths_may_not_leave_the_dataset(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for forged in ("../../etc/passwd", "/etc/passwd"):
        meta = json.loads((data / "meta.json").read_text())
        meta["splits"]["test"]["files"] = [forged]
        (data / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(PreparedDataError, match="must be relative and stay inside"):
            DatasetMeta.load(data)


def _config(edit):
    """A manifest edit of the embedding's export config."""
    return lambda a: _edit_manifest(a, lambda m: edit(m["embedding"]["config"]))


def _set(key, value):
    def edit(cfg):
        cfg[key] = value

    return _config(edit)


def _swap_first_two(key):
    def edit(cfg):
        cfg[key][0], cfg[key][1] = cfg[key][1], cfg[key][0]

    return _config(edit)


def _stored(art: Path, key: str, edit) -> None:
    """Tensor ``key`` replaced by ``edit(tensor)``, manifest dtype, shape and checksum forged."""

    def change(tensors):
        tensors[key] = edit(tensors[key])
        return (key,)

    _forged_tensors(art, change)
    dtype = str(load_file(str(art / TENSORS_FILE))[key].dtype).removeprefix("torch.")
    _edit_manifest(art, lambda m: m["tensors"][key].update(dtype=dtype))


def _forged_dtype(key, dtype):
    def edit(m):
        m["tensors"][key]["dtype"] = dtype

    return lambda a: _edit_manifest(a, edit)


def _out_of_range_code(tier: int, bits: int):
    """The first stored code of ``tier`` set to ``2**bits - 1`` (a valid bit pattern, beyond
    the tier's centroids), checksum forged: sizes, dtypes and shapes all still agree."""

    def edit(stream):
        stream = stream.clone()
        stream[0] = stream[0] | ((1 << bits) - 1)
        return stream

    return lambda a: _stored(a, f"embedding.codes.{tier}", edit)


def _codebook_artifact(tiny_data, tmp_path, method: str, budget: str, **options) -> Path:
    torch.manual_seed(0)
    layer = EmbeddingLayer(features_from_dataset(tiny_data), 8, method, budget, **options)
    model = build_model("deepfm", layer, 3, hidden=[16, 8]).eval()
    clean = tmp_path / "clean"
    export(model, clean, dataset=tiny_data)
    return clean


def _doubled_dim(art: Path) -> None:
    """Config, codes and codebooks consistently at twice the model's dim (8 sub-spaces of the
    same width): every size agrees except with the model's."""
    for key, edit in (
        ("embedding.codes.0", lambda t: torch.cat([t, t])),
        ("embedding.values", lambda t: torch.cat([t, t], dim=1)),
    ):
        _stored(art, key, edit)
    _set("dim", 16)(art)
    _set("parts", 8)(art)


# DPQ with 12 centroids: 4-bit codes, so codes 12..15 are representable and wrong.
CODEBOOK_CASES = {
    "parts": (_set("parts", 8), "the config needs torch.uint8 of"),
    "choices_huge": (_set("choices", [1 << 30]), "choices must lie in [2, 256]"),
    "choices_wider_codes": (_set("choices", [64]), "the config needs torch.uint8 of"),
    "choices_same_bits": (_set("choices", [13]), "'values' is torch.float32 of"),
    "cardinalities_huge": (
        lambda a: (_set("cardinalities", [10**12] * 8)(a), _set("heads", [10**12] * 8)(a)),
        "the config needs",
    ),
    "cardinalities_swapped": (
        lambda a: (_swap_first_two("cardinalities")(a), _swap_first_two("heads")(a)),
        "its cardinality is",
    ),
    "groups": (_set("groups", 8), "'values' is torch.float32 of"),
    "values_dtype": (_set("dtype", "fp16"), "the config needs torch.float16"),
    "config_dim": (_set("dim", 16), "'values' is torch.float32 of"),
    "config_dim_consistent": (_doubled_dim, "codebook: config dim 16, the embedding's is 8"),
    "fields_renamed": (
        _config(lambda c: c["fields"].__setitem__(0, "C9")),
        "are not the features",
    ),
    "fields_dropped": (_config(lambda c: c["fields"].pop()), "one cardinality and head count"),
    "codes_truncated": (
        lambda a: _stored(a, "embedding.codes.0", lambda t: t[: len(t) // 2].clone()),
        "tensor 'codes.0' is torch.uint8 of",
    ),
    "codes_dtype": (
        lambda a: _stored(a, "embedding.codes.0", lambda t: t.to(torch.int16)),
        "tensor 'codes.0' is torch.int16",
    ),
    "codes_dtype_lie": (_forged_dtype("embedding.codes.0", "int8"), "manifest says int8"),
    "values_reshaped": (
        lambda a: _stored(a, "embedding.values", lambda t: t.reshape(-1)[:-2].clone()),
        "'values' is torch.float32 of",
    ),
    "code_out_of_range": (_out_of_range_code(0, 4), "holds code 15 for row 0 of field 'C1'"),
}


def test_hostile_dpq_artifacts_are_refused(tiny_data, tmp_path):
    """A codebook artifact's config states every size of its codes and codebooks: each lie,
    each tensor that disagrees and each code beyond its codebook is refused in one line."""
    clean = _codebook_artifact(tiny_data, tmp_path, "dpq", "10x", choices=12)
    config = json.loads((clean / MANIFEST_FILE).read_text())["embedding"]["config"]
    assert (config["choices"], config["groups"], config["parts"]) == ([12], 1, 4)
    _check_refused(clean, tmp_path, CODEBOOK_CASES)


def _tail_dropped(art: Path) -> None:
    """The tail tier's code stream removed, manifest and checksum forged to match."""
    key = "embedding.codes.1"
    _forged_tensors(art, lambda tensors: (tensors.pop(key), ())[1])
    _edit_manifest(art, lambda m: m["tensors"].pop(key))


MGQE_CASES = {
    "heads_beyond_rows": (
        _config(lambda c: c["heads"].__setitem__(0, c["cardinalities"][0] + 1)),
        "heads within them",
    ),
    "one_tier_heads": (_set("choices", [12]), "every row is a head row"),
    "tiers_widened": (_set("choices", [12, 12]), "the config needs torch.uint8 of"),
    "groups_shared": (_set("groups", 1), "'values' is torch.float32 of"),
    "tail_missing": (_tail_dropped, "differ from the config's"),
    # 5 tail centroids: 3-bit codes, 5..7 representable and wrong.
    "tail_code_out_of_range": (_out_of_range_code(1, 3), "its tier has 5 centroids"),
    "head_code_out_of_range": (_out_of_range_code(0, 4), "its tier has 12 centroids"),
}


def test_hostile_mgqe_artifacts_are_refused(tiny_data, tmp_path):
    """Two tiers at their own code widths, one codebook per field: the tiers' streams and
    centroid counts are checked each against its own tier."""
    clean = _codebook_artifact(
        tiny_data, tmp_path, "mgqe", "4x", head_choices=12, tail_choices=5, codebooks="field"
    )
    config = json.loads((clean / MANIFEST_FILE).read_text())["embedding"]["config"]
    assert (config["choices"], config["groups"]) == ([12, 5], 8)
    assert 0 < sum(config["heads"]) < sum(config["cardinalities"])
    _check_refused(clean, tmp_path, MGQE_CASES)


def _index_map(edit):
    return _config(lambda c: edit(c["index_map"]))


DEDUP_CASES = {
    "remap_out_of_range": (
        lambda a: _stored(a, "embedding.index_map.remap", lambda t: t.clone().fill_(10**6)),
        "remap entries outside",
    ),
    "remap_negative": (
        lambda a: _stored(a, "embedding.index_map.remap", lambda t: t.clone().fill_(-1)),
        "remap entries outside",
    ),
    "remap_truncated": (
        lambda a: _stored(a, "embedding.index_map.remap", lambda t: t[: len(t) // 2].clone()),
        "remap has",
    ),
    "remap_dtype": (
        lambda a: _stored(a, "embedding.index_map.remap", lambda t: t.long()),
        "needs an int32 vector",
    ),
    "blocks_inflated": (
        _index_map(lambda m: m.__setitem__("blocks", m["blocks"] * 4)),
        "blocks of",
    ),
    "block_rows": (
        _index_map(lambda m: m.__setitem__("block_rows", m["block_rows"] * 2)),
        "blocks of",
    ),
    "offsets_shifted": (
        _index_map(lambda m: m["offsets"].__setitem__(1, m["offsets"][1] + 1)),
        "the features' cardinalities place it at",
    ),
    "offsets_dropped": (_index_map(lambda m: m["offsets"].pop()), "one offset per feature"),
    "table_rows": (
        _config(lambda c: c["tables"][0].__setitem__("rows", 10**9)),
        "need",
    ),
    "table_truncated": (
        lambda a: _stored(a, "embedding.table.blocks", lambda t: t[: len(t) // 2].clone()),
        "need",
    ),
    "config_dim": (_set("dim", 16), "tables: config dim 16, the embedding's is 8"),
}


def test_hostile_dedup_artifacts_are_refused(tiny_data, tmp_path):
    """Dedup serves a table of distinct blocks through a block remap: the remap's length and
    entries, the block count and size and the fields' offsets are checked at load."""
    torch.manual_seed(0)
    layer = EmbeddingLayer(features_from_dataset(tiny_data), 8, "dedup", "2x")
    layer.compressor.run_stage(Stage("dedup", trains=False), None)
    model = build_model("deepfm", layer, 3, hidden=[16, 8]).eval()
    clean = tmp_path / "clean"
    export(model, clean, dataset=tiny_data)
    index_map = json.loads((clean / MANIFEST_FILE).read_text())["embedding"]["config"]
    assert index_map["index_map"]["kind"] == "block_remap"
    _check_refused(clean, tmp_path, DEDUP_CASES)
