"""Moved to :mod:`ctr.serving.http` (``app``, ``config``, ``requests``, ``models``,
``batcher``, ``reload``, ``metrics``); this name stays for one release."""

from ctr.serving.http.app import create_app, serve
from ctr.serving.http.batcher import Batcher, Pending, RawColumns, run_batch
from ctr.serving.http.config import MiB, ServeConfig
from ctr.serving.http.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram, Metrics
from ctr.serving.http.models import Served, forward, load_served, resolve_artifact
from ctr.serving.http.reload import ModelManager
from ctr.serving.http.requests import JSON_TYPES, RequestError, ids_records, request_columns
from ctr.serving.manifest import serving_footprint

__all__ = [
    "BATCH_BUCKETS",
    "JSON_TYPES",
    "LATENCY_BUCKETS",
    "Batcher",
    "Histogram",
    "Metrics",
    "MiB",
    "ModelManager",
    "Pending",
    "RawColumns",
    "RequestError",
    "ServeConfig",
    "Served",
    "create_app",
    "forward",
    "ids_records",
    "load_served",
    "request_columns",
    "resolve_artifact",
    "run_batch",
    "serve",
    "serving_footprint",
]
