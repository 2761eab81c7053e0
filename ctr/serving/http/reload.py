"""Hot swapping: load and verify an artifact in the background, then swap atomically.

``POST /v1/reload`` or ``SIGHUP`` reloads the source (for a directory of versions: the newest
one), which is also polled. Requests already queued finish on the model they were accepted
by; an artifact that fails verification is refused (409) and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ctr.serving.http.metrics import Metrics
from ctr.serving.http.models import Served, load_served, resolve_artifact
from ctr.serving.http.requests import RequestError
from ctr.serving.manifest import MANIFEST_FILE, ArtifactError
from datasets.io import file_sha256

log = logging.getLogger("ctr.serve")

#: the youngest generation's threshold (Python's default: 700 allocations): a request's
#: parsed body lives until its batch is answered, so at the default it survives young
#: collections, is promoted, and soon pushes the interpreter into a full collection
GC_THRESHOLD = (50_000, 20, 100)
#: seconds after a swap before the collector settles again (batches on the old model finish)
SETTLE_AFTER_SWAP_S = 5.0
_settled = False  # settle_gc ran: this process is a server (not, say, a test's app)


def settle_gc(unfreeze: bool = False) -> None:
    """Moves every object alive now (the model, torch's and the libraries' state) out of the
    cyclic collector's reach, and makes young collections rarer.

    Under load, requests waiting for their batch outlived young collections, and every few
    seconds the collector walked the whole heap (a few hundred thousand objects: tens to
    hundreds of ms with every thread of the process stopped, the p99 of a loaded server).
    Frozen objects are never walked (nor written: forked workers keep sharing their pages);
    a swap settles again once the old model is done with (:data:`SETTLE_AFTER_SWAP_S`),
    with ``unfreeze`` so that the old model's cycles are collected."""
    global _settled
    _settled = True
    if unfreeze:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


class ModelManager:
    """The served model, and atomic swaps to a newly loaded and verified one."""

    def __init__(
        self,
        source: Path,
        served: Served,
        metrics: Metrics,
        poll_s: float,
        serving_options: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.source = source
        self.serving_options = serving_options
        self.current = served
        self.metrics = metrics
        self.poll_s = poll_s
        self.versioned = not (source / MANIFEST_FILE).exists()
        self.last_error: str | None = None
        self._refused: dict[Path, int] = {}  # path -> manifest mtime when refused
        self._lock = asyncio.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="ctr-loader")
        self._tasks: set[asyncio.Task] = set()

    async def reload(self, reason: str) -> dict[str, Any]:
        """Loads the source's artifact (newest version) and swaps it in; raises
        :class:`RequestError` (409) when it is refused — the current model keeps serving."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                path = await loop.run_in_executor(self._loader, resolve_artifact, self.source)
                checksum = await loop.run_in_executor(
                    self._loader, file_sha256, path / MANIFEST_FILE
                )
                if path == self.current.path and checksum == self.current.checksum:
                    self.metrics.reloads["unchanged"] += 1
                    return {"swapped": False, "version": self.current.version}
                served = await loop.run_in_executor(
                    self._loader, load_served, path, self.serving_options
                )
            except Exception as e:
                self.metrics.reloads["refused"] += 1
                self.last_error = f"{e}"
                with contextlib.suppress(OSError, UnboundLocalError):
                    self._refused[path] = (path / MANIFEST_FILE).stat().st_mtime_ns
                log.warning(
                    "reload (%s) refused, still serving %s: %s", reason, self.current.path, e
                )
                raise RequestError(
                    409, f"refused: {e}; still serving version {self.current.version!r}"
                ) from e
            old, self.current = self.current, served
            self.metrics.reloads["swapped"] += 1
            log.warning("reload (%s): %s -> %s", reason, old.path, served.path)
            if _settled:
                loop.call_later(SETTLE_AFTER_SWAP_S, settle_gc, True)
            return {"swapped": True, "version": served.version, "checksum": served.checksum}

    def reload_soon(self, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._quiet_reload(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quiet_reload(self, reason: str) -> None:
        with contextlib.suppress(RequestError):
            await self.reload(reason)

    async def poll(self) -> None:
        """Watches a directory of versions for a newer one (refused versions are skipped
        until their manifest changes)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                path = await loop.run_in_executor(self._loader, resolve_artifact, self.source)
                mtime = (path / MANIFEST_FILE).stat().st_mtime_ns
            except (ArtifactError, OSError):
                continue
            if path != self.current.path and self._refused.get(path) != mtime:
                await self._quiet_reload("new version")

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
