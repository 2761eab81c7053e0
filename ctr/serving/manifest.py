"""An artifact's ``manifest.json``: the typed :class:`Manifest`, its file names and its checks.

An artifact is a directory of ``manifest.json``, ``tensors.safetensors`` (the embedding's
serving tensors under ``embedding.``, the rest of the model under ``model.``) and, for raw-value
serving of id-keyed methods, the dataset's ``vocabulary.parquet``. The manifest records schema,
method, dims, dtypes, shapes and sha256 checksums; :meth:`Manifest.from_json` checks every size
it states before anything is built from it, so a hostile manifest gets a one-line
:class:`ArtifactError` naming the file and field.

Example::

    manifest = read_manifest(Path("artifacts/deepfm"))
    manifest.method, manifest.serve_bytes, manifest.footprint()
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ctr.models import MODELS
from datasets.io import only_names
from datasets.prepared import VOCAB_FILE

ARTIFACT_FORMAT = "ctr-compress/artifact"
ARTIFACT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
EMBEDDING_PREFIX = "embedding."
MODEL_PREFIX = "model."
# Every file an artifact may hold; the manifest must list a checksum for each one present.
ARTIFACT_FILES = frozenset({MANIFEST_FILE, TENSORS_FILE, VOCAB_FILE})

# A manifest states a few hundred values per field at most; anything larger is not one.
MAX_MANIFEST_BYTES = 16 << 20
# Bounds on sizes a manifest states, checked before anything is built from them.
MAX_DIM = 1 << 14
MAX_DENSE = 1 << 16
MAX_CARDINALITY = 1 << 40


class ArtifactError(ValueError):
    """An artifact that is missing, corrupt or inconsistent with its manifest."""


@dataclass
class Manifest:
    """The manifest's records; :meth:`to_json` is the file's layout, every key spelled once.

    - ``model``: ``{"name", "options", "num_dense"}`` (a :data:`ctr.models.MODELS` entry).
    - ``features``: each :class:`FeatureSpec`'s JSON (name, cardinality, multi_hot, ...).
    - ``embedding``: ``kind`` (the export kind), ``method``, ``dim``, ``config``,
      ``serve_bytes``, ``memory``, ``hyperparameters``, ``fingerprint_fields`` (fields served
      by hashing the raw value's fingerprint: no vocabulary for them) and ``footprint``.
    - ``tensors``: name -> ``{"dtype", "shape"}`` of every stored tensor.
    - ``dataset``: name, label, dense, sparse, options and (with a vocabulary) its sha256 and
      cardinalities; None when exported without the dataset.
    - ``files``: file name -> sha256 of every file but the manifest.
    - ``extra``: any further top-level keys (``ctr export`` records the ``run``).
    """

    model: dict[str, Any]
    features: list[dict[str, Any]]
    embedding: dict[str, Any]
    tensors: dict[str, dict[str, Any]]
    dataset: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = ARTIFACT_FORMAT
    version: int = ARTIFACT_VERSION

    REQUIRED = ("model", "features", "embedding", "tensors", "files")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "model": self.model,
            "features": self.features,
            "embedding": self.embedding,
            "tensors": self.tensors,
            "dataset": self.dataset,
            **self.extra,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, data: Any, where: str | Path = "manifest") -> Manifest:
        """Checks ``data`` (format, version, required keys, every stated size) or raises
        :class:`ArtifactError` naming ``where``."""
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected a JSON object")
        if data.get("format") != ARTIFACT_FORMAT or data.get("version") != ARTIFACT_VERSION:
            raise ArtifactError(
                f"{where}: format {data.get('format')!r} v{data.get('version')} is not "
                f"{ARTIFACT_FORMAT} v{ARTIFACT_VERSION}"
            )
        for key in cls.REQUIRED:
            if key not in data:
                raise ArtifactError(f"{where}: manifest lacks {key!r}")
        _check_sizes(data, where)
        known = {"format", "version", "dataset", *cls.REQUIRED}
        return cls(
            model=data["model"],
            features=data["features"],
            embedding=data["embedding"],
            tensors=data["tensors"],
            dataset=data.get("dataset"),
            files=data["files"],
            extra={k: v for k, v in data.items() if k not in known},
            format=data["format"],
            version=data["version"],
        )

    @property
    def method(self) -> str:
        return self.embedding["method"]

    @property
    def kind(self) -> str:
        """The export kind, which picks the serving module (``compressors.build_serving``)."""
        return self.embedding["kind"]

    @property
    def serve_bytes(self) -> int:
        return int(self.embedding["serve_bytes"])

    @property
    def fingerprint_fields(self) -> list[str]:
        return list(self.embedding.get("fingerprint_fields", []))

    @property
    def feature_names(self) -> list[str]:
        return [f["name"] for f in self.features]

    def footprint(self) -> dict[str, int]:
        """What a server holds for the embeddings: the tables (``serve_bytes``) and, when raw
        values are served through an id vocabulary, the vocabulary as the artifact stores it
        (recorded at export; artifacts from before that count the tables only)."""
        return _footprint(self.embedding)


def serving_footprint(manifest: dict[str, Any]) -> dict[str, int]:
    """:meth:`Manifest.footprint` of a manifest's JSON (as ``CompactModel.manifest`` holds it)."""
    return _footprint(manifest["embedding"])


def _footprint(embedding: dict[str, Any]) -> dict[str, int]:
    tables = int(embedding["serve_bytes"])
    recorded = embedding.get("footprint")
    return dict(recorded) if recorded else {"tables": tables, "vocabulary": 0, "total": tables}


def is_artifact(path: Path) -> bool:
    """Whether directory ``path`` holds an artifact and nothing else."""
    try:
        fmt = json.loads((path / MANIFEST_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return False
    return fmt == ARTIFACT_FORMAT and only_names(path, ARTIFACT_FILES)


def load_manifest(root: Path) -> Manifest:
    """Reads and checks ``root/manifest.json`` (size-bounded, no links) or raises."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{root}: not an artifact (no {MANIFEST_FILE})")
    check_own_file(path)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{path}: {size:,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,} (not read)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    except RecursionError:
        raise ArtifactError(f"{path}: JSON nested too deeply to be a manifest") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from e
    return Manifest.from_json(data, path)


def read_manifest(root: Path) -> dict[str, Any]:
    """:func:`load_manifest` as the manifest's JSON."""
    return load_manifest(root).to_json()


def check_own_file(path: Path) -> None:
    """Refuses a link: an artifact's files are its own, never a path elsewhere on the host."""
    if path.is_symlink():
        raise ArtifactError(f"{path}: is a symbolic link; an artifact holds its own files")


def check_file_list(root: Path, files: dict[str, str]) -> None:
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
            check_own_file(root / name)
        required = name == TENSORS_FILE or (root / name).exists()
        if required and name not in files:
            raise ArtifactError(f"{path}: lists no checksum for {name}; the file list is damaged")


def check_vocabulary_rows(root: Path, manifest: dict[str, Any] | Manifest) -> None:
    """The vocabulary holds at most the rows the manifest's cardinalities declare, read from
    the parquet footer before any row is decoded (a small file can encode millions)."""
    if isinstance(manifest, dict):
        manifest = Manifest.from_json(manifest, root / MANIFEST_FILE)
    path = root / VOCAB_FILE
    if VOCAB_FILE not in manifest.files or not path.is_file():
        return
    check_own_file(path)
    keyed = set(manifest.fingerprint_fields)
    declared = sum(f["cardinality"] - 1 for f in manifest.features if f["name"] not in keyed)
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from e
    if rows > declared:
        raise ArtifactError(
            f"{path}: {rows:,} rows, more than the {declared:,} values the manifest's "
            "features declare (not read)"
        )


def _check_sizes(manifest: dict[str, Any], path: str | Path) -> None:
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
