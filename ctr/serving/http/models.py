"""The served model: loading and verifying an artifact for the server, and its forward.

:func:`load_served` loads an artifact (checksums, shapes, a warm-up forward whose output must
be finite) into a :class:`Served`; :func:`resolve_artifact` picks the newest version of a
directory of versions (natural order: v2 < v10); :func:`forward` runs one model forward over
a batch's encoded parts.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from ctr.serving.compact import CompactModel
from ctr.serving.http.requests import ids_records
from ctr.serving.manifest import MANIFEST_FILE, ArtifactError
from datasets.encode import EncodedRecords, RawEncoder
from datasets.io import file_sha256

log = logging.getLogger("ctr.serve")


@dataclass
class Served:
    """A loaded, verified artifact and what answering with it needs."""

    model: CompactModel
    path: Path
    checksum: str
    encoder: RawEncoder | None
    dense: list[str]
    sparse: list[dict[str, Any]]
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.path.name

    @functools.cached_property
    def raw_fields(self) -> frozenset[str]:
        """The fields a request of raw values may name."""
        return frozenset(self.encoder.fields) if self.encoder is not None else frozenset()

    @functools.cached_property
    def id_fields(self) -> frozenset[str]:
        """The fields a request of ids (``"ids": true``) may name."""
        return frozenset(self.dense) | {f["name"] for f in self.sparse}

    def metadata(self) -> dict[str, Any]:
        manifest = self.model.manifest
        emb = manifest["embedding"]
        memory = emb.get("memory", {})
        footprint = self.model.spec.footprint()
        return {
            "version": self.version,
            "path": str(self.path),
            "checksum": self.checksum,
            "loaded_at": self.loaded_at,
            "model": manifest["model"],
            "method": emb["method"],
            "hyperparameters": emb.get("hyperparameters", {}),
            "dim": emb["dim"],
            "fields": [{"name": d, "kind": "dense"} for d in self.dense]
            + [
                {
                    "name": f["name"],
                    "kind": "multi_hot" if f["multi_hot"] else "sparse",
                    "cardinality": f["cardinality"],
                }
                for f in self.sparse
            ],
            "serve_bytes": emb["serve_bytes"],
            "ratio": memory.get("full_bytes", 0) / max(emb["serve_bytes"], 1),
            "footprint": footprint,
            # In memory after loading (binary's fast decode holds more than serve_bytes).
            "resident_bytes": self.model.resident_bytes,
            "fingerprint_fields": self.model.fingerprint_fields,
            "dataset": (manifest.get("dataset") or {}).get("name"),
            "inputs": {"raw": self.encoder is not None, "ids": True},
        }


def load_served(
    path: Path, serving_options: Mapping[str, Mapping[str, str]] | None = None
) -> Served:
    """Loads and verifies ``path`` (checksums, shapes, a warm-up forward) or raises;
    ``serving_options`` maps an export kind to its serving module's options
    (:meth:`ServeConfig.module_options`)."""
    model = CompactModel.load(path, verify=True, serving_options=serving_options)
    unused = sorted(set(serving_options or {}) - {model.spec.kind})
    if unused:
        # Options are per export kind; a directory of versions may hold several methods.
        log.warning(
            "%s: serving options for %s unused (the artifact's export kind is %r)",
            path,
            ", ".join(unused),
            model.spec.kind,
        )
    try:
        encoder: RawEncoder | None = model.raw_encoder
    except ArtifactError:
        encoder = None
    info = model.manifest.get("dataset") or {}
    served = Served(
        model=model,
        path=path,
        checksum=file_sha256(path / MANIFEST_FILE),
        encoder=encoder,
        dense=list(info.get("dense", [])),
        sparse=list(model.manifest["features"]),
    )
    # Warm up (fbgemm's first call, the encoder's per-field indexes) and check the output.
    encoded = (
        encoder.encode_columns({encoder.fields[0]: [None]})  # builds every field's index
        if encoder is not None
        else ids_records(served, {}, 1)
    )
    probs = forward(served, [encoded])
    if not np.isfinite(probs).all():
        raise ArtifactError(f"{path}: the model predicts non-finite values")
    return served


def resolve_artifact(source: Path) -> Path:
    """``source`` itself when it is an artifact, else its newest version subdirectory."""
    if (source / MANIFEST_FILE).exists():
        return source
    if not source.is_dir():
        raise ArtifactError(f"{source}: no such artifact or directory")
    versions = [
        d
        for d in source.iterdir()
        if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST_FILE).exists()
    ]
    if not versions:
        raise ArtifactError(
            f"{source}: not an artifact (no {MANIFEST_FILE}) and holds no artifact versions"
        )
    return max(versions, key=_version_key)


def _version_key(path: Path) -> tuple[Any, ...]:
    """Natural order: v2 < v10; numeric runs compare as numbers."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", path.name)
        if part
    )


def forward(served: Served, parts: Sequence[EncodedRecords]) -> np.ndarray:
    """Click probabilities of the concatenated ``parts`` in one model forward."""
    dense = torch.from_numpy(
        np.concatenate([p.dense for p in parts]) if len(parts) > 1 else parts[0].dense
    )
    n = dense.shape[0]
    values, lengths = [], []
    ones = np.ones(max(len(p.dense) for p in parts), dtype=np.int64)
    for f in served.sparse:
        name = f["name"]
        for p in parts:
            ids = p.sparse[name]
            if isinstance(ids, list):
                lens = p.lengths.get(name)
                if lens is None:
                    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                values.append(np.concatenate(ids) if ids else np.zeros(0, np.int64))
                lengths.append(lens)
            else:
                values.append(ids)
                lengths.append(ones[: len(ids)])
    kjt = KeyedJaggedTensor(
        keys=[f["name"] for f in served.sparse],
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
        stride=n,
    )
    with torch.inference_mode():
        # Raw values' ids come from the encoder, and ids sent as such were range-checked
        # on arrival (ids_records): no second check per forward.
        return torch.sigmoid(served.model.forward_encoded(dense, kjt)).numpy()
