"""Silent wrong results refused: another vocabulary, out-of-range ids, bad labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import KeyedJaggedTensor

from ctr.cli import main
from ctr.embedding import EmbeddingLayer
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta, PreparedDataError
from datasets.synthetic import SyntheticConfig, generate_synthetic

CONFIG = SyntheticConfig(rows=3_000, cardinalities=(30, 200, 50), num_dense=2, multi_hot_fields=1)
TRAIN = ["--dim", "4", "--batch-size", "256", "--model-opt", "hidden=[8]", "--no-progress"]


def _synth(path: Path, seed: int = 0, overwrite: bool = False) -> Path:
    config = SyntheticConfig(**{**CONFIG.__dict__, "seed": seed})
    generate_synthetic(path, config, progress=False, overwrite=overwrite)
    return path


def _swap_vocabulary_ids(data: Path) -> None:
    """Re-maps two values of C1 (ids 1 <-> 2): same cardinalities, other meanings."""
    table = pq.read_table(data / "vocab.parquet")
    ids = table["id"].to_numpy().copy()
    c1 = (table["field"].to_numpy(zero_copy_only=False) == "C1") & np.isin(ids, (1, 2))
    ids[c1] = 3 - ids[c1]
    pq.write_table(table.set_column(2, "id", pa.array(ids, pa.int32())), data / "vocab.parquet")


def _rewrite_shard(data: Path, split: str, edit) -> None:
    """Applies ``edit(table) -> table`` to the split's first shard."""
    shard = DatasetMeta.load(data).files(split)[0]
    pq.write_table(edit(pq.read_table(shard)), shard)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, finished run, its artifact), trained with a relative --data path."""
    root = tmp_path_factory.mktemp("identity")
    data = _synth(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["train", "--data", "data", "--out", "run", *TRAIN]) == 0
    assert main(["export", str(root / "run"), "--out", str(root / "art")]) == 0
    return data, root / "run", root / "art"


def test_run_records_resolved_path_and_vocabulary(trained, tmp_path, monkeypatch):
    data, run, _ = trained
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == str(data.resolve())
    assert config["vocabulary"] == DatasetMeta.load(data).vocabulary()
    monkeypatch.chdir(tmp_path)  # export works from anywhere
    assert main(["export", str(run), "--out", "elsewhere"]) == 0


def test_reprepared_data_is_refused_at_export_predict_and_resume(trained, tmp_path, capsys):
    data, run, art = trained
    other = _synth(tmp_path / "other", seed=1)
    assert main(["predict", str(art), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"{other} does not match the artifact {art}: cardinalities differ" in err
    # The run's own dataset re-prepared with another seed under the same path:
    copy_root = tmp_path / "copy"
    shutil.copytree(run.parent, copy_root, ignore=shutil.ignore_patterns("art*", "elsewhere"))
    config = json.loads((copy_root / "run" / "config.json").read_text())
    config["data"] = str(copy_root / "data")
    (copy_root / "run" / "config.json").write_text(json.dumps(config))
    _swap_vocabulary_ids(copy_root / "data")
    assert main(["predict", str(art), "--data", str(copy_root / "data")]) == 2
    assert "vocab.parquet sha256" in capsys.readouterr().err
    assert main(["export", str(copy_root / "run"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "does not match the vocabulary the run was trained with: vocab.parquet" in err
    assert not (tmp_path / "a").exists()
    argv = ["train", "--data", str(copy_root / "data"), "--out", str(copy_root / "run"), *TRAIN]
    assert main(argv) == 2
    assert "(resuming)" in capsys.readouterr().err


def test_export_refuses_a_vocabulary_changed_after_the_check(trained, tmp_path):
    from ctr.serving.export import export
    from ctr.serving.manifest import ArtifactError
    from ctr.training.run import load_run_model

    data, run, _ = trained
    model, cfg = load_run_model(run)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    _swap_vocabulary_ids(other)
    with pytest.raises(ArtifactError, match="not the vocabulary the model was trained with"):
        export(model, tmp_path / "a", dataset=other, vocabulary=cfg.vocabulary)


def test_out_of_range_ids_are_reported_with_their_value(tmp_path):
    data = _synth(tmp_path / "neg")

    def negative(table: pa.Table) -> pa.Table:
        ids = table["C2"].to_numpy().copy()
        ids[7] = -5
        return table.set_column(table.schema.get_field_index("C2"), "C2", pa.array(ids))

    _rewrite_shard(data, "train", negative)
    with pytest.raises(PreparedDataError, match=r"'C2' has id -5 outside \[0, "):
        list(BatchLoader(data, "train", 512))

    multi = _synth(tmp_path / "multi")
    card = DatasetMeta.load(multi).sparse[-1].cardinality

    def too_large(table: pa.Table) -> pa.Table:
        col = table["M1"].combine_chunks()
        values = col.flatten().to_numpy().copy()
        values[3] = card + 10
        fixed = pa.ListArray.from_arrays(col.offsets, pa.array(values, pa.int32()))
        return table.set_column(table.schema.get_field_index("M1"), "M1", fixed)

    _rewrite_shard(multi, "train", too_large)
    with pytest.raises(PreparedDataError, match=rf"'M1' has id {card + 10} outside \[0, {card}\)"):
        list(BatchLoader(multi, "train", 512))


def test_embedding_layer_refuses_out_of_range_ids(trained):
    data, _, _ = trained
    layer = EmbeddingLayer.from_dataset(data, dim=4, compressor="hash", budget="2x")
    names = DatasetMeta.load(data).sparse_names
    good = [1] * len(names)
    layer(
        KeyedJaggedTensor.from_lengths_sync(
            names, torch.tensor(good), torch.ones(len(names), dtype=torch.long)
        )
    )
    for bad_value in (-1, 10**6):
        values = torch.tensor([*good[:-1], bad_value])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            names, values, torch.ones(len(names), dtype=torch.long)
        )
        with pytest.raises(ValueError, match=rf"{names[-1]!r} has id {bad_value} outside"):
            layer(kjt)


def test_nan_labels_and_dense_values_are_named(tmp_path):
    data = _synth(tmp_path / "nan")

    def nan_label(table: pa.Table) -> pa.Table:
        labels = table["label"].to_numpy().copy()
        labels[11] = np.nan
        return table.set_column(0, "label", pa.array(labels))

    _rewrite_shard(data, "valid", nan_label)
    with pytest.raises(PreparedDataError, match="row 11 has label nan in column 'label'"):
        list(BatchLoader(data, "valid", 512))


def test_corrupt_vocabulary_and_frequencies_are_one_line_errors(tmp_path, capsys):
    for name in ("vocab.parquet", "frequencies.safetensors"):
        data = _synth(tmp_path / name)
        path = data / name
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\xff" * 64
        raw[-12:] = b"\x00" * 12  # a broken footer/header
        path.write_bytes(bytes(raw))
        argv = ["train", "--data", str(data), "--out", str(tmp_path / f"run-{name}"), *TRAIN]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and err.count("\n") == 1, err
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")  # a broken header
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: unreadable frequency file")
