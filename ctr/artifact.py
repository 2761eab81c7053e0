"""Moved to :mod:`ctr.serving` (``manifest``, ``export``, ``compact``); this name stays for one
release."""

from ctr.embedding import ServingEmbedding
from ctr.serving.compact import CompactModel
from ctr.serving.export import export, serving_footprint
from ctr.serving.manifest import (
    ARTIFACT_FILES,
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    EMBEDDING_PREFIX,
    MANIFEST_FILE,
    MAX_CARDINALITY,
    MAX_DENSE,
    MAX_DIM,
    MAX_MANIFEST_BYTES,
    MODEL_PREFIX,
    TENSORS_FILE,
    ArtifactError,
    Manifest,
    check_vocabulary_rows,
    is_artifact,
    read_manifest,
)

__all__ = [
    "ARTIFACT_FILES",
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "EMBEDDING_PREFIX",
    "MANIFEST_FILE",
    "MAX_CARDINALITY",
    "MAX_DENSE",
    "MAX_DIM",
    "MAX_MANIFEST_BYTES",
    "MODEL_PREFIX",
    "TENSORS_FILE",
    "ArtifactError",
    "CompactModel",
    "Manifest",
    "ServingEmbedding",
    "check_vocabulary_rows",
    "export",
    "is_artifact",
    "read_manifest",
    "serving_footprint",
]
