"""Serving artifacts: ``manifest.json`` + ``tensors.safetensors``, loadable without pickle.

The safetensors file holds the embedding's serving tensors under ``embedding.`` (their bytes
are exactly the method's ``serve_bytes``) and the rest of the model under ``model.``; the
manifest records schema, method, dims, dtypes, shapes and sha256 checksums, all verified on
load. ``CompactModel`` rebuilds the model around fbgemm's int-N serving kernels.

Example::

    export(model, "artifacts/deepfm", dataset="data/synth")
    compact = CompactModel.load("artifacts/deepfm")
    probs = compact.predict_loader(BatchLoader("data/synth", "test"))
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors import ExportedEmbedding, build_serving
from compressors.core.keys import FingerprintKeys
from ctr.embedding import IdRangeCheck, features_from_dataset
from ctr.models import MODELS, CTRModel
from datasets.encode import RawEncoder, format_for_meta, load_field_vocabs
from datasets.format import VOCAB_FILE, DatasetMeta, SparseField
from datasets.io import only_names, replace_dir
from datasets.loader import BatchLoader

ARTIFACT_FORMAT = "ctr-compress/artifact"
ARTIFACT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
EMBEDDING_PREFIX = "embedding."
MODEL_PREFIX = "model."
# Every file an artifact may hold; the manifest must list a checksum for each one present.
ARTIFACT_FILES = frozenset({MANIFEST_FILE, TENSORS_FILE, VOCAB_FILE})


class ArtifactError(ValueError):
    """An artifact that is missing, corrupt or inconsistent with its manifest."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(
    model: CTRModel,
    path: str | os.PathLike,
    dataset: str | os.PathLike | DatasetMeta | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    vocabulary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the artifact directory ``path`` atomically; returns its manifest.

    ``dataset`` (optional) contributes the schema and vocabulary so the artifact can
    predict from raw feature values. ``path`` must be absent or empty, or hold an artifact
    and ``overwrite`` be set. ``vocabulary`` (the run's recorded ``DatasetMeta.vocabulary()``)
    makes export refuse a dataset whose vocabulary has changed since training.
    """
    path = Path(path)
    embedding = model.embedding.export()
    tensors = {EMBEDDING_PREFIX + k: v.detach().contiguous() for k, v in embedding.tensors.items()}
    for k, v in model.state_dict().items():
        if not k.startswith("embedding."):
            tensors[MODEL_PREFIX + k] = v.detach().contiguous()
    memory = model.embedding.memory()
    keyed = list(getattr(model.embedding, "fingerprint_fields", []))
    meta = (
        dataset
        if isinstance(dataset, DatasetMeta) or dataset is None
        else DatasetMeta.load(dataset)
    )
    manifest: dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "model": {"name": model.name, "options": model.options, "num_dense": model.num_dense},
        "features": [f.to_json() for f in model.embedding.features],
        "embedding": {
            "kind": embedding.kind,
            "method": model.embedding.method,
            "dim": model.embedding.dim,
            "config": embedding.config,
            "serve_bytes": embedding.nbytes,
            "memory": memory.to_json(),
            "hyperparameters": model.embedding.compressor.hyperparameters(),
            # Fields served by hashing the raw value's fingerprint: no vocabulary for them.
            "fingerprint_fields": keyed,
        },
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()
        },
        "dataset": None
        if meta is None
        else {
            "name": meta.name,
            "label": meta.label,
            "dense": meta.dense,
            "sparse": [f.name for f in meta.sparse],
            "options": meta.options,
        },
        **(extra or {}),
    }
    with replace_dir(path, "serving artifact", is_artifact, overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        manifest["files"] = {TENSORS_FILE: _sha256(tmp / TENSORS_FILE)}
        id_fields = [f.name for f in model.embedding.features if f.name not in keyed]
        if (
            meta is not None
            and meta.root is not None
            and (meta.root / VOCAB_FILE).exists()
            and id_fields
        ):
            # The dataset's vocabulary must be the one the model was trained with (a
            # re-prepared dataset would pair new ids with old weights).
            source_sha = _sha256(meta.root / VOCAB_FILE)
            expected = (vocabulary or {}).get("sha256")
            if expected and expected != source_sha:
                raise ArtifactError(
                    f"{meta.root / VOCAB_FILE}: sha256 {source_sha[:12]}… is "
                    f"not the vocabulary the model was trained with ({expected[:12]}…); "
                    "the dataset was re-prepared since — export would pair new ids with old weights"
                )
            _write_vocabulary(meta.root / VOCAB_FILE, tmp / VOCAB_FILE, id_fields, keyed)
            manifest["files"][VOCAB_FILE] = _sha256(tmp / VOCAB_FILE)
            manifest["dataset"]["vocabulary"] = {
                "sha256": source_sha,
                "cardinalities": {f.name: f.cardinality for f in meta.sparse},
            }
        manifest["embedding"]["footprint"] = serving_footprint(
            embedding.nbytes, tmp / VOCAB_FILE if VOCAB_FILE in manifest["files"] else None
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


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


class ServingEmbedding(nn.Module):
    """A serving module with the attributes models expect of an embedding layer."""

    def __init__(
        self,
        module: nn.Module,
        num_features: int,
        dim: int,
        method: str,
        cardinality: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.num_features = num_features
        self.dim = dim
        self.method = method
        self.check_ids = IdRangeCheck(cardinality) if cardinality is not None else None

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if self.check_ids is not None:
            self.check_ids(features)
        return self.module(features)


class CompactModel(nn.Module):
    """A loaded artifact: the model over low-precision serving tables.

    ``forward(dense, sparse)`` returns logits like the trained model (``sparse`` holds ids, and
    raw-value fingerprints for the :attr:`fingerprint_fields`); ``predict_loader`` returns
    click probabilities for a prepared split, ``predict_records`` for raw values.
    """

    def __init__(self, model: CTRModel, manifest: dict[str, Any], root: Path) -> None:
        super().__init__()
        self.model = model.eval()
        self.manifest = manifest
        self.root = root

    @property
    def serve_bytes(self) -> int:
        return int(self.manifest["embedding"]["serve_bytes"])

    @property
    def resident_bytes(self) -> int:
        """Bytes the loaded embedding tables hold in memory: ``serve_bytes``, except where
        serving re-lays the stored format for speed (``binary``'s decoded rows)."""
        return int(getattr(self.model.embedding.module, "resident_bytes", self.serve_bytes))

    @property
    def feature_names(self) -> list[str]:
        return [f["name"] for f in self.manifest["features"]]

    def check_dataset(self, meta: DatasetMeta) -> None:
        """Refuses a prepared dataset whose fields or vocabulary are not the artifact's."""
        features = self.manifest["features"]
        if meta.sparse_names != self.feature_names:
            raise ArtifactError(
                f"{meta.root} has sparse fields {meta.sparse_names[:5]}..., the artifact "
                f"{self.root} expects {self.feature_names[:5]}..."
            )
        num_dense = self.manifest["model"]["num_dense"]
        if len(meta.dense) != num_dense:
            raise ArtifactError(
                f"{meta.root} has {len(meta.dense)} dense features, the artifact {self.root} "
                f"expects {num_dense}"
            )
        info = self.manifest.get("dataset") or {}
        expected = info.get("vocabulary") or {
            "sha256": self.manifest["files"].get(VOCAB_FILE),
            "cardinalities": {f["name"]: f["cardinality"] for f in features},
        }
        meta.check_vocabulary(expected, f"the artifact {self.root}")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        verify: bool = True,
        serving_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> CompactModel:
        """Loads (and by default verifies) an artifact. ``serving_options`` maps an export
        kind to its serving module's options, e.g. ``{"binary": {"decode": "auto"}}`` (a
        faster decode that holds more than the artifact's bytes: see ``resident_bytes``)."""
        root = Path(path)
        manifest = read_manifest(root)
        tensor_file = root / TENSORS_FILE
        _check_file_list(root, manifest["files"])
        check_vocabulary_rows(root, manifest)
        if verify:
            for name, digest in manifest["files"].items():
                if not (root / name).is_file():
                    raise ArtifactError(f"{root / name}: missing (listed in the manifest)")
                if _sha256(root / name) != digest:
                    raise ArtifactError(f"{root / name}: checksum mismatch — the file is corrupt")
        try:
            # safetensors checks every tensor's extent against the file's size, so this
            # allocates at most the file's bytes whatever the header claims.
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{tensor_file}: unreadable ({e})") from e
        _check_tensors(tensors, manifest["tensors"], tensor_file)
        emb = manifest["embedding"]
        exported = ExportedEmbedding(
            kind=emb["kind"],
            config=emb["config"],
            tensors={
                k[len(EMBEDDING_PREFIX) :]: v
                for k, v in tensors.items()
                if k.startswith(EMBEDDING_PREFIX)
            },
        )
        spec = manifest["model"]
        dense = {
            k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)
        }
        _check_architecture(manifest, dense, root / MANIFEST_FILE)
        # Modules initialise random weights before the stored ones overwrite them; loading
        # an artifact must not move the caller's random stream.
        with torch.random.fork_rng():
            try:
                module = build_serving(exported, serving_options)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise ArtifactError(
                    f"{root / MANIFEST_FILE}: the embedding config does not fit the stored "
                    f"tensors ({e})"
                ) from e
            serving = ServingEmbedding(
                module,
                len(manifest["features"]),
                emb["dim"],
                emb["method"],
                # Fingerprint-keyed fields receive 64-bit fingerprints, not ids: no range.
                None
                if emb.get("fingerprint_fields")
                else {f["name"]: f["cardinality"] for f in manifest["features"]},
            )
            model = MODELS[spec["name"]](serving, spec["num_dense"], **spec["options"])
        dense = {
            k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)
        }
        result = model.load_state_dict(dense, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("embedding.")]
        if missing or result.unexpected_keys:
            raise ArtifactError(
                f"{tensor_file}: weights do not fit model {spec['name']!r} "
                f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
        return cls(model, manifest, root)

    @torch.no_grad()
    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.model(dense, sparse)

    @torch.no_grad()
    def predict_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        """Click probabilities for raw feature values (vocabulary lookup included).

        Records map field names to raw values as the dataset's files hold them (missing
        fields count as missing values); needs an artifact exported with its dataset.
        """
        batch = self.raw_encoder.encode(records).to_batch()
        return torch.sigmoid(self.model(batch.dense_features, batch.sparse_features)).numpy()

    @property
    def fingerprint_fields(self) -> list[str]:
        """Fields this model keys by raw-value fingerprint (its input for them: fingerprints)."""
        return list(self.manifest["embedding"].get("fingerprint_fields", []))

    @torch.no_grad()
    def predict_columns(self, columns: dict[str, list[Any]]) -> np.ndarray:
        """Like :meth:`predict_records` for columns (field -> equally long value lists),
        encoded column by column without a loop over rows."""
        batch = self.raw_encoder.encode_columns(columns).to_batch()
        return torch.sigmoid(self.model(batch.dense_features, batch.sparse_features)).numpy()

    @functools.cached_property
    def raw_encoder(self) -> RawEncoder:
        info = self.manifest.get("dataset")
        keyed = self.fingerprint_fields
        needs_vocab = len(keyed) < len(self.manifest["features"])
        if not info or (needs_vocab and VOCAB_FILE not in self.manifest["files"]):
            raise ArtifactError(
                f"{self.root}: exported without its dataset, so raw values cannot be encoded; "
                "pass ids, or export with dataset=..."
            )
        meta = DatasetMeta(
            name=info["name"],
            label=info["label"],
            dense=info["dense"],
            sparse=[
                SparseField(f["name"], f["cardinality"], f["multi_hot"])
                for f in self.manifest["features"]
            ],
            splits={},
            options=info["options"],
            root=self.root,
        )
        check_vocabulary_rows(self.root, self.manifest)
        vocabs = load_field_vocabs(meta, [f.name for f in meta.sparse if f.name not in keyed])
        return RawEncoder(meta, format_for_meta(meta), vocabs, keyed)

    @torch.no_grad()
    def predict_loader(self, loader: BatchLoader) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) over every batch of ``loader``.

        A fingerprint-keyed model gets the prepared ids translated through the loader's
        dataset vocabulary (the artifact itself holds none)."""
        keys: nn.Module = nn.Identity()
        if self.fingerprint_fields:
            features = features_from_dataset(loader.meta, fingerprints=True)
            keys = FingerprintKeys(features, self.fingerprint_fields)
        probs, labels = [], []
        for batch in loader.epoch(0):
            sparse = keys(batch.sparse_features)
            probs.append(torch.sigmoid(self.model(batch.dense_features, sparse)))
            labels.append(batch.labels)
        return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def is_artifact(path: Path) -> bool:
    """Whether directory ``path`` holds an artifact and nothing else."""
    try:
        fmt = json.loads((path / MANIFEST_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return False
    return fmt == ARTIFACT_FORMAT and only_names(path, ARTIFACT_FILES)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{root}: not an artifact (no {MANIFEST_FILE})")
    _check_own_file(path)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{path}: {size:,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,} (not read)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    except RecursionError:
        raise ArtifactError(f"{path}: JSON nested too deeply to be a manifest") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    if manifest.get("format") != ARTIFACT_FORMAT or manifest.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
            f"{ARTIFACT_FORMAT} v{ARTIFACT_VERSION}"
        )
    for key in ("model", "features", "embedding", "tensors", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest lacks {key!r}")
    _check_manifest_sizes(manifest, path)
    return manifest


# A manifest states a few hundred values per field at most; anything larger is not one.
MAX_MANIFEST_BYTES = 16 << 20


def _check_own_file(path: Path) -> None:
    """Refuses a link: an artifact's files are its own, never a path elsewhere on the host."""
    if path.is_symlink():
        raise ArtifactError(f"{path}: is a symbolic link; an artifact holds its own files")


def check_vocabulary_rows(root: Path, manifest: dict[str, Any]) -> None:
    """The vocabulary holds at most the rows the manifest's cardinalities declare, read from
    the parquet footer before any row is decoded (a small file can encode millions)."""
    path = root / VOCAB_FILE
    if VOCAB_FILE not in manifest["files"] or not path.is_file():
        return
    _check_own_file(path)
    keyed = set(manifest["embedding"].get("fingerprint_fields", []))
    declared = sum(f["cardinality"] - 1 for f in manifest["features"] if f["name"] not in keyed)
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from e
    if rows > declared:
        raise ArtifactError(
            f"{path}: {rows:,} rows, more than the {declared:,} values the manifest's "
            "features declare (not read)"
        )


# Bounds on sizes a manifest states, checked before anything is built from them.
MAX_DIM = 1 << 14
MAX_DENSE = 1 << 16
MAX_CARDINALITY = 1 << 40


def _check_manifest_sizes(manifest: dict[str, Any], path: Path) -> None:
    """Every size the manifest states is an integer in a sane range (one-line errors)."""

    def require(ok: bool, what: str) -> None:
        if not ok:
            raise ArtifactError(f"{path}: {what}")

    def is_int(x: Any, low: int, high: int) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high

    model, emb = manifest["model"], manifest["embedding"]
    require(isinstance(model, dict) and isinstance(emb, dict), "model/embedding must be objects")
    require(
        isinstance(model.get("name"), str) and model["name"] in MODELS,
        f"unknown model {model.get('name')!r}; known: {sorted(MODELS)}",
    )
    require(isinstance(model.get("options"), dict), "model options must be an object")
    require(
        is_int(model.get("num_dense"), 0, MAX_DENSE),
        f"num_dense {model.get('num_dense')!r} is not an integer in [0, {MAX_DENSE}]",
    )
    require(
        is_int(emb.get("dim"), 1, MAX_DIM),
        f"embedding dim {emb.get('dim')!r} is not an integer in [1, {MAX_DIM}]",
    )
    require(isinstance(emb.get("config"), dict), "embedding config must be an object")
    features = manifest["features"]
    require(isinstance(features, list) and len(features) > 0, "features must be a list")
    for f in features:
        require(
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and is_int(f.get("cardinality"), 1, MAX_CARDINALITY),
            f"feature {f!r} needs a name and a cardinality in [1, {MAX_CARDINALITY}]",
        )
    tensors = manifest["tensors"]
    require(isinstance(tensors, dict), "tensors must be an object")
    for name, spec in tensors.items():
        require(
            isinstance(spec, dict)
            and isinstance(spec.get("dtype"), str)
            and isinstance(spec.get("shape"), list)
            and all(is_int(n, 0, 1 << 62) for n in spec["shape"]),
            f"tensor {name!r}: needs a dtype and a shape of non-negative integers",
        )
    files = manifest["files"]
    require(
        isinstance(files, dict) and all(isinstance(v, str) for v in files.values()),
        "files must map file names to sha256 digests",
    )


def _check_file_list(root: Path, files: dict[str, str]) -> None:
    """The files are the format's, not the manifest's choice: every one present is listed
    (so verified), and nothing outside the artifact's own names is ever opened."""
    path = root / MANIFEST_FILE
    allowed = ARTIFACT_FILES - {MANIFEST_FILE}
    foreign = sorted(set(files) - allowed)
    if foreign:
        raise ArtifactError(
            f"{path}: lists {foreign[:3]}; an artifact holds only {sorted(allowed)}"
        )
    for name in sorted(allowed):
        if (root / name).is_symlink():
            _check_own_file(root / name)
        required = name == TENSORS_FILE or (root / name).exists()
        if required and name not in files:
            raise ArtifactError(f"{path}: lists no checksum for {name}; the file list is damaged")


def _check_architecture(
    manifest: dict[str, Any], dense: dict[str, torch.Tensor], path: Path
) -> None:
    """The model the manifest describes has exactly the stored tensors' names and shapes.

    The skeleton is built on the meta device, so sizes such as ``hidden`` or ``num_dense``
    allocate nothing until they have been matched against the tensors actually stored.
    """
    spec, emb = manifest["model"], manifest["embedding"]
    stub = ServingEmbedding(nn.Identity(), len(manifest["features"]), emb["dim"], emb["method"])
    try:
        with torch.device("meta"):
            skeleton = MODELS[spec["name"]](stub, spec["num_dense"], **spec["options"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: model {spec['name']!r} cannot be built ({e})") from e
    expected = {
        k: tuple(v.shape)
        for k, v in skeleton.state_dict().items()
        if not k.startswith("embedding.")
    }
    actual = {k: tuple(v.shape) for k, v in dense.items()}
    if expected != actual:
        diff = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
        raise ArtifactError(
            f"{path}: model {spec['name']!r} as described needs other tensors than stored "
            + ", ".join(f"{k}: {expected.get(k)} vs {actual.get(k)}" for k in diff[:3])
        )


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, Any], where: Path) -> None:
    if set(tensors) != set(expected):
        raise ArtifactError(
            f"{where}: tensors differ from the manifest "
            f"(extra {sorted(set(tensors) - set(expected))[:5]}, "
            f"missing {sorted(set(expected) - set(tensors))[:5]})"
        )
    for name, spec in expected.items():
        t = tensors[name]
        if list(t.shape) != spec["shape"] or str(t.dtype).removeprefix("torch.") != spec["dtype"]:
            raise ArtifactError(
                f"{where}: tensor {name!r} is {t.dtype} {list(t.shape)}, "
                f"manifest says {spec['dtype']} {spec['shape']}"
            )
