"""The 2-process ``torchrun`` command the DMP tests launch."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A port the OS just handed out: a fixed one collides with another test session's group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*target: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` processes on a free port, running
    ``target`` (a script and its arguments, or ``-m module ...``)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        *target,
    ]
