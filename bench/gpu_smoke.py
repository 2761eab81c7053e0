"""The ``gpu_smoke`` bench section: every registered method trains, exports, predicts and serves
on one CUDA device, in a few minutes.

On a machine where torch sees no CUDA device it prints one line saying it was skipped and
returns. Otherwise, on small synthetic data (20k rows, generated in a temporary directory):
for every method (``--methods`` restricts them) a run of ``--gpu-smoke-steps`` training steps
per stage with ``device="cuda"`` (``ctr train --device cuda``: the model, fbgemm-gpu's fused
CUDA tables and the batches on the GPU), its export, the artifact reloaded and predicting the
test split (``ctr predict``'s path, :meth:`~ctr.serving.compact.CompactModel.predict_loader`)
and serving records (``ctr serve``'s path, ``predict_records``). Serving runs on the host: the
artifact's int-N tables are fbgemm's CPU kernels. A method that fails is a row with its error
(one line), never an exception; the table says each stage's wall time and the test AUC.

Run: ``python bench.py --only gpu_smoke`` (``--methods full,pep``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.output import print_table

# Budgets every method reaches on the smoke data (int16 stops at 2x; full is 1x).
BUDGETS = {"full": "1x", "int16": "2x", "int8": "3x"}
DEFAULT_BUDGET = "4x"
ROWS = 20_000
BATCH = 512


def skip_reason() -> str | None:
    """Why the section cannot run here (None: a CUDA device is there)."""
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def smoke_one(
    method: str, data: Path, out: Path, steps: int, device: str = "cuda"
) -> dict[str, Any]:
    """Trains (on ``device``), exports, predicts and serves ``method``; its figures or its
    one-line error."""
    from ctr import CompactModel, export
    from ctr.training.metrics import auc_logloss
    from ctr.training.run import RunConfig, load_run_model, train_run
    from ctr.training.trainer import TrainConfig
    from datasets.loader import BatchLoader
    from datasets.prepared import DatasetMeta

    row: dict[str, Any] = {"method": method}
    try:
        start = time.perf_counter()
        epochs = min(1.0, steps * BATCH / DatasetMeta.load(data).rows("train"))
        cfg = RunConfig(
            data=str(data),
            model="deepfm",
            compressor=method,
            budget=BUDGETS.get(method, DEFAULT_BUDGET),
            train=TrainConfig(epochs=epochs, batch_size=BATCH, progress=False, device=device),
        )
        summary = train_run(cfg, out / "run")
        row["train s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        model, _ = load_run_model(out / "run")
        export(model, out / "artifact", dataset=data)
        row["export s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        compact = CompactModel.load(out / "artifact")
        probs, labels = compact.predict_loader(BatchLoader(data, "test", 4096))
        row["predict s"] = round(time.perf_counter() - start, 2)
        row["test auc"] = round(auc_logloss(labels, probs)["auc"], 4)
        row["train test auc"] = round(float(summary.get("test_auc", float("nan"))), 4)
        start = time.perf_counter()
        records = [{name: 0 for name in compact.feature_names}] * 8
        served = compact.predict_records(records)
        row["serve s"] = round(time.perf_counter() - start, 3)
        row["status"] = "ok" if len(served) == len(records) else "served a wrong count"
    except Exception as e:  # noqa: BLE001 - every failure is this method's row
        row["status"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:200]
    return row


def bench_gpu_smoke(args: argparse.Namespace) -> dict[str, Any]:
    """Every method trains, exports, predicts and serves on one GPU (skipped without CUDA)."""
    reason = skip_reason()
    if reason is not None:
        print(f"gpu_smoke: skipped: {reason}")
        return {"skipped": reason}
    import torch

    from compressors import available
    from datasets.synthetic import SyntheticConfig, generate_synthetic

    methods = [m for m in (getattr(args, "methods", "") or "").split(",") if m] or available()
    steps = getattr(args, "gpu_smoke_steps", 20)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        data = Path(tmp) / "data"
        generate_synthetic(data, SyntheticConfig(rows=ROWS, scale=0.001), progress=False)
        for method in methods:
            rows.append(smoke_one(method, data, Path(tmp) / method, steps))
            print(f"  {method:10s} {rows[-1]['status']}", flush=True)
    device = torch.cuda.get_device_name(0)
    print_table(f"gpu_smoke: every method on {device}, {steps} steps a stage", rows)
    return {"device": device, "steps": steps, "rows": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("gpu_smoke").add_argument(
        "--gpu-smoke-steps", type=int, default=20, help="gpu_smoke: training steps per stage"
    )
