"""Where a single-process run computes: ``--device auto`` (the default) picks the first CUDA
device when torch sees one, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` name one. The
environment variable ``CTR_DEVICE`` (a device name) decides what ``auto`` means instead: the
test suite sets it to ``cpu``, so it checks the CPU path on any machine and its tests marked
``cuda`` name their device.

On CUDA the model, its fused tables (fbgemm-gpu's CUDA kernels: ``FusedEmbeddingBagCollection``
builds its kernel for the weights' device) and every batch live on the device; evaluation
brings predictions back to the host. Under ``torchrun`` the process group decides instead
(NCCL on CUDA, gloo on CPU; :mod:`ctr.training.distributed`).

Example::

    device = resolve_device("auto")  # cuda:0 on a GPU machine, cpu elsewhere
"""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device(name: str, source: str = "--device") -> None:
    """Refuses a malformed device name (before anything is built), naming its ``source``."""
    index = name[5:] if name.startswith("cuda:") else ""
    if name not in ("auto", "cpu", "cuda") and not index.isdigit():
        raise ValueError(f"{source}: expected {DEVICE_CHOICES}, got {name!r}")


def resolve_device(name: str) -> torch.device:
    """The device ``--device name`` means on this machine; a CUDA device that is not there is
    an error naming the flag."""
    check_device(name)
    if name == "auto":
        name = os.environ.get("CTR_DEVICE", "auto")
        check_device(name, "CTR_DEVICE (what --device auto means)")
    if name == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: torch sees no CUDA device here (torch.cuda.is_available() "
                "is False); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device
