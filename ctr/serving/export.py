"""Serving artifacts: ``manifest.json`` + ``tensors.safetensors``, loadable without pickle.

:func:`export` writes a trained model's artifact: the embedding's serving tensors (their bytes
are exactly the method's ``serve_bytes``) and the rest of the model in one safetensors file,
the :class:`~ctr.serving.manifest.Manifest` with their checksums, and (with the dataset) the
raw value -> id vocabulary of the id-keyed fields. :class:`~ctr.serving.compact.CompactModel`
loads it back for inference.

Example::

    export(model, "artifacts/deepfm", dataset="data/synth")
    compact = CompactModel.load("artifacts/deepfm")
    probs = compact.predict_loader(BatchLoader("data/synth", "test"))
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.torch import save_file

from ctr.models import CTRModel
from ctr.serving.manifest import (
    EMBEDDING_PREFIX,
    MANIFEST_FILE,
    MODEL_PREFIX,
    TENSORS_FILE,
    ArtifactError,
    Manifest,
    is_artifact,
)
from datasets.io import file_sha256, replace_dir
from datasets.prepared import VOCAB_FILE, DatasetMeta


def export(
    model: CTRModel,
    path: str | os.PathLike,
    dataset: str | os.PathLike | DatasetMeta | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    vocabulary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the artifact directory ``path`` atomically; returns its manifest's JSON.

    ``dataset`` (optional) contributes the schema and vocabulary so the artifact can
    predict from raw feature values. ``path`` must be absent or empty, or hold an artifact
    and ``overwrite`` be set. ``vocabulary`` (the run's recorded ``DatasetMeta.vocabulary()``)
    makes export refuse a dataset whose vocabulary has changed since training. ``extra``
    adds top-level keys (``ctr export`` records the run).
    """
    path = Path(path)
    embedding = model.embedding.export()
    # The artifact is host memory, whatever device the model trained on.
    tensors = {
        EMBEDDING_PREFIX + k: v.detach().cpu().contiguous() for k, v in embedding.tensors.items()
    }
    for k, v in model.state_dict().items():
        if not k.startswith("embedding."):
            tensors[MODEL_PREFIX + k] = v.detach().cpu().contiguous()
    memory = model.embedding.memory()
    keyed = list(getattr(model.embedding, "fingerprint_fields", []))
    meta = (
        dataset
        if isinstance(dataset, DatasetMeta) or dataset is None
        else DatasetMeta.load(dataset)
    )
    manifest = Manifest(
        model={"name": model.name, "options": model.options, "num_dense": model.num_dense},
        features=[f.to_json() for f in model.embedding.features],
        embedding={
            "kind": embedding.kind,
            "method": model.embedding.method,
            "dim": model.embedding.dim,
            "config": embedding.config,
            "serve_bytes": embedding.nbytes,
            "memory": memory.to_json(),
            "hyperparameters": model.embedding.compressor.hyperparameters(),
            "fingerprint_fields": keyed,
        },
        tensors={
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()
        },
        dataset=None
        if meta is None
        else {
            "name": meta.name,
            "label": meta.label,
            "dense": meta.dense,
            "sparse": [f.name for f in meta.sparse],
            "options": meta.options,
        },
        extra=dict(extra or {}),
    )
    with replace_dir(path, "serving artifact", is_artifact, overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        manifest.files = {TENSORS_FILE: file_sha256(tmp / TENSORS_FILE)}
        id_fields = [f.name for f in model.embedding.features if f.name not in keyed]
        if (
            meta is not None
            and meta.root is not None
            and (meta.root / VOCAB_FILE).exists()
            and id_fields
        ):
            # The dataset's vocabulary must be the one the model was trained with (a
            # re-prepared dataset would pair new ids with old weights).
            source_sha = file_sha256(meta.root / VOCAB_FILE)
            expected = (vocabulary or {}).get("sha256")
            if expected and expected != source_sha:
                raise ArtifactError(
                    f"{meta.root / VOCAB_FILE}: sha256 {source_sha[:12]}… is "
                    f"not the vocabulary the model was trained with ({expected[:12]}…); "
                    "the dataset was re-prepared since — export would pair new ids with old weights"
                )
            _write_vocabulary(meta.root / VOCAB_FILE, tmp / VOCAB_FILE, id_fields, keyed)
            manifest.files[VOCAB_FILE] = file_sha256(tmp / VOCAB_FILE)
            assert manifest.dataset is not None
            manifest.dataset["vocabulary"] = {
                "sha256": source_sha,
                "cardinalities": {f.name: f.cardinality for f in meta.sparse},
            }
        manifest.embedding["footprint"] = serving_footprint(
            embedding.nbytes, tmp / VOCAB_FILE if VOCAB_FILE in manifest.files else None
        )
        data = manifest.to_json()
        # Inside the staging directory, which replace_dir renames into place whole; a plain
        # write keeps the usual file mode (atomic_write's temporary file is 0600).
        (tmp / MANIFEST_FILE).write_text(json.dumps(data, indent=2))
    return data


def _write_vocabulary(source: Path, dest: Path, fields: list[str], keyed: list[str]) -> None:
    """The dataset's vocabulary, restricted to the id-keyed fields (all of it when none is
    fingerprint-keyed: then a plain copy)."""
    if not keyed:
        shutil.copyfile(source, dest)
        return
    table = pq.read_table(source)
    pq.write_table(table.filter(pc.is_in(table["field"], value_set=pa.array(fields))), dest)


def serving_footprint(tables: int, vocabulary: Path | None) -> dict[str, int]:
    """Everything a server holds for the embeddings: the tables (``serve_bytes``) and, for
    raw-value serving of id-keyed methods, the raw value -> id vocabulary (its bytes as the
    artifact stores it), reported as its own part."""
    vocab = vocabulary.stat().st_size if vocabulary is not None else 0
    return {"tables": tables, "vocabulary": vocab, "total": tables + vocab}
