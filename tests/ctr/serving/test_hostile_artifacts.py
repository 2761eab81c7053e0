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
    for name, (_, expected) in cases.items():
        message, grown_mb = results[str(tmp_path / name)]
        assert message is not None, f"{name}: loaded"
        assert message.startswith("ArtifactError: ") and expected in message, (name, message)
        assert "\n" not in message, (name, message)
        assert grown_mb < ALLOWED_GROWTH_MB, (name, grown_mb)


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
