"""Loading an artifact for inference: :class:`CompactModel`, verified whole before it is built.

``CompactModel.load`` reads the :class:`~ctr.serving.manifest.Manifest`, checks the file list,
every checksum and every tensor's dtype and shape against it, builds the model's skeleton on
the meta device to match the stored tensors before allocating anything, and rebuilds the model
around the method's serving module (fbgemm's int-N kernels where they apply).

Options: ``serving_options`` maps an export kind to its serving module's options (e.g.
``{"binary": {"decode": "auto"}}``; ``ctr serve --serving-opt binary.decode=auto``).

Example::

    compact = CompactModel.load("artifacts/deepfm")
    probs = compact.predict_records([{"C1": "68fd1e64", "I1": 3}])
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors import ExportedEmbedding, build_serving
from compressors.core.keys import FingerprintKeys
from ctr.embedding import ServingEmbedding, features_from_dataset  # noqa: F401 (re-export)
from ctr.models import MODELS, CTRModel
from ctr.serving.manifest import (
    EMBEDDING_PREFIX,
    MANIFEST_FILE,
    MODEL_PREFIX,
    TENSORS_FILE,
    ArtifactError,
    Manifest,
    check_file_list,
    check_vocabulary_rows,
    load_manifest,
)
from datasets.encode import RawEncoder, format_for_meta, load_field_vocabs
from datasets.io import file_sha256
from datasets.loader import BatchLoader
from datasets.prepared import VOCAB_FILE, DatasetMeta, SparseField


class CompactModel(nn.Module):
    """A loaded artifact: the model over low-precision serving tables.

    ``forward(dense, sparse)`` returns logits like the trained model (``sparse`` holds ids, and
    raw-value fingerprints for the :attr:`fingerprint_fields`); ``predict_loader`` returns
    click probabilities for a prepared split, ``predict_records`` for raw values.
    """

    def __init__(self, model: CTRModel, manifest: dict[str, Any] | Manifest, root: Path) -> None:
        super().__init__()
        self.model = model.eval()
        self.spec = (
            manifest
            if isinstance(manifest, Manifest)
            else Manifest.from_json(manifest, root / MANIFEST_FILE)
        )
        # The manifest's JSON, as ``export`` returned it (read by callers as a dict).
        self.manifest = self.spec.to_json()
        self.root = root

    @property
    def serve_bytes(self) -> int:
        return self.spec.serve_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes the loaded embedding tables hold in memory: ``serve_bytes``, except where
        serving re-lays the stored format for speed (``binary``'s decoded rows)."""
        return int(getattr(self.model.embedding.module, "resident_bytes", self.serve_bytes))

    @property
    def feature_names(self) -> list[str]:
        return self.spec.feature_names

    def check_dataset(self, meta: DatasetMeta) -> None:
        """Refuses a prepared dataset whose fields or vocabulary are not the artifact's."""
        features = self.spec.features
        if meta.sparse_names != self.feature_names:
            raise ArtifactError(
                f"{meta.root} has sparse fields {meta.sparse_names[:5]}..., the artifact "
                f"{self.root} expects {self.feature_names[:5]}..."
            )
        num_dense = self.spec.model["num_dense"]
        if len(meta.dense) != num_dense:
            raise ArtifactError(
                f"{meta.root} has {len(meta.dense)} dense features, the artifact {self.root} "
                f"expects {num_dense}"
            )
        info = self.spec.dataset or {}
        expected = info.get("vocabulary") or {
            "sha256": self.spec.files.get(VOCAB_FILE),
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
        spec = load_manifest(root)
        tensor_file = root / TENSORS_FILE
        check_file_list(root, spec.files)
        check_vocabulary_rows(root, spec)
        if verify:
            for name, digest in spec.files.items():
                if not (root / name).is_file():
                    raise ArtifactError(f"{root / name}: missing (listed in the manifest)")
                if file_sha256(root / name) != digest:
                    raise ArtifactError(f"{root / name}: checksum mismatch — the file is corrupt")
        try:
            # safetensors checks every tensor's extent against the file's size, so this
            # allocates at most the file's bytes whatever the header claims.
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{tensor_file}: unreadable ({e})") from e
        _check_tensors(tensors, spec.tensors, tensor_file)
        emb = spec.embedding
        exported = ExportedEmbedding(
            kind=emb["kind"],
            config=emb["config"],
            tensors={
                k[len(EMBEDDING_PREFIX) :]: v
                for k, v in tensors.items()
                if k.startswith(EMBEDDING_PREFIX)
            },
        )
        arch = spec.model
        dense = {
            k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)
        }
        _check_architecture(spec, dense, root / MANIFEST_FILE)
        # Modules initialise random weights before the stored ones overwrite them; loading
        # an artifact must not move the caller's random stream.
        with torch.random.fork_rng():
            try:
                module = build_serving(exported, serving_options)
                # A module whose config states per-field sizes checks them against the
                # model's features: a self-consistent config for other fields fits every
                # tensor and would serve other rows.
                check = getattr(module, "check_fields", None)
                if check is not None:
                    check({f["name"]: f["cardinality"] for f in spec.features}, emb["dim"])
            except (ValueError, KeyError, TypeError, IndexError) as e:
                given = dict((serving_options or {}).get(exported.kind, {}))
                what = f"config or the serving options {given}" if given else "config"
                raise ArtifactError(
                    f"{root / MANIFEST_FILE}: the embedding {what} does not fit the stored "
                    f"tensors ({e})"
                ) from e
            serving = ServingEmbedding(
                module,
                len(spec.features),
                emb["dim"],
                emb["method"],
                # Fingerprint-keyed fields receive 64-bit fingerprints, not ids: no range.
                None
                if spec.fingerprint_fields
                else {f["name"]: f["cardinality"] for f in spec.features},
            )
            model = MODELS[arch["name"]](serving, arch["num_dense"], **arch["options"])
        result = model.load_state_dict(dense, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("embedding.")]
        if missing or result.unexpected_keys:
            raise ArtifactError(
                f"{tensor_file}: weights do not fit model {arch['name']!r} "
                f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
        return cls(model, spec, root)

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
        logits = self.forward_encoded(batch.dense_features, batch.sparse_features)
        return torch.sigmoid(logits).numpy()

    @property
    def fingerprint_fields(self) -> list[str]:
        """Fields this model keys by raw-value fingerprint (its input for them: fingerprints)."""
        return self.spec.fingerprint_fields

    @torch.no_grad()
    def predict_columns(self, columns: dict[str, list[Any]]) -> np.ndarray:
        """Like :meth:`predict_records` for columns (field -> equally long value lists),
        encoded column by column without a loop over rows."""
        batch = self.raw_encoder.encode_columns(columns).to_batch()
        logits = self.forward_encoded(batch.dense_features, batch.sparse_features)
        return torch.sigmoid(logits).numpy()

    @torch.no_grad()
    def forward_encoded(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """:meth:`forward` for ids already known to lie in their fields' ranges (the raw
        encoder's, or ids checked on arrival): without the serving embedding's range check
        of every call, a tenth of a one-row prediction."""
        embedding = self.model.embedding
        if isinstance(embedding, ServingEmbedding) and type(self.model).forward is CTRModel.forward:
            return self.model.logits(dense, embedding.module(sparse))
        return self.model(dense, sparse)

    @functools.cached_property
    def raw_encoder(self) -> RawEncoder:
        info = self.spec.dataset
        keyed = self.fingerprint_fields
        needs_vocab = len(keyed) < len(self.spec.features)
        if not info or (needs_vocab and VOCAB_FILE not in self.spec.files):
            raise ArtifactError(
                f"{self.root}: exported without its dataset, so raw values cannot be encoded; "
                "pass ids, or export with dataset=..."
            )
        meta = DatasetMeta(
            name=info["name"],
            label=info["label"],
            dense=info["dense"],
            sparse=[
                SparseField(f["name"], f["cardinality"], f["multi_hot"]) for f in self.spec.features
            ],
            splits={},
            options=info["options"],
            root=self.root,
        )
        check_vocabulary_rows(self.root, self.spec)
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


def _check_architecture(manifest: Manifest, dense: dict[str, torch.Tensor], path: Path) -> None:
    """The model the manifest describes has exactly the stored tensors' names and shapes.

    The skeleton is built on the meta device, so sizes such as ``hidden`` or ``num_dense``
    allocate nothing until they have been matched against the tensors actually stored.
    """
    spec, emb = manifest.model, manifest.embedding
    stub = ServingEmbedding(nn.Identity(), len(manifest.features), emb["dim"], emb["method"])
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
