"""Serving: artifacts (export, manifest, loading for inference) and the HTTP server.

- :mod:`ctr.serving.manifest`: the typed :class:`Manifest`, the artifact's file names, checks.
- :mod:`ctr.serving.export`: :func:`export` writes a trained model's artifact.
- :mod:`ctr.serving.compact`: :class:`CompactModel` loads one for inference.
- :mod:`ctr.serving.http`: ``ctr serve`` (requests, models, batcher, reload, metrics, app).

Example::

    from ctr.serving import CompactModel, export
    export(model, "artifacts/deepfm", dataset="data/synth")
    compact = CompactModel.load("artifacts/deepfm")
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562), so the light modules (``http.config``) stay light.
_EXPORTS = {
    "ArtifactError": "ctr.serving.manifest",
    "Manifest": "ctr.serving.manifest",
    "read_manifest": "ctr.serving.manifest",
    "export": "ctr.serving.export",
    "CompactModel": "ctr.serving.compact",
    "ServeConfig": "ctr.serving.http.config",
    "create_app": "ctr.serving.http.app",
    "serve": "ctr.serving.http.app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ctr.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
