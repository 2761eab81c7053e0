"""The CPUs and memory this process may actually use, and torch's threads set to match.

``os.cpu_count()`` counts the machine's cores, not the ones a process may run on: a container
limited by a cgroup CPU quota, or a process pinned by ``taskset``, that starts one torch
thread per core oversubscribes its share, and OpenMP's default spin-waiting then burns the
time slices the other threads need (a run sharing two cores with three others went 34x
slower for 2-3x less CPU). :func:`configure_threads` sets torch's threads to the CPUs
available (affinity and cgroup quota), makes idle OpenMP threads sleep instead of spin, and
says once when other processes already keep those CPUs busy.

Example::

    threads = configure_threads()          # before the first torch computation
    need, have = 2 << 30, available_memory_bytes()
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
_warned = False


def available_cpus(cgroup: Path = CGROUP) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2
    ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(cgroup: Path) -> float | None:
    """The cgroup's CPU quota in CPUs, or None when unlimited or unknown."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_memory_bytes(cgroup: Path = CGROUP, meminfo: Path = Path("/proc/meminfo")) -> int:
    """Memory this process can still allocate: the machine's ``MemAvailable``, capped by what
    the cgroup's ``memory.max`` leaves (a container's limit is lower than the host's)."""
    available = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available if available is not None else 1 << 62


def busy_cpus(loadavg: Path = Path("/proc/loadavg")) -> float:
    """How many CPUs other processes keep busy: the larger of the 1-minute load average and
    the runnable tasks now (less this one)."""
    try:
        fields = loadavg.read_text().split()
        return max(float(fields[0]), int(fields[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return 0.0


def configure_threads(threads: int | None = None, warn: bool = True) -> int:
    """Sets torch's intra-op threads to ``threads`` (default: ``OMP_NUM_THREADS`` when set,
    else :func:`available_cpus`); returns the count. Idle OpenMP threads sleep
    (``OMP_WAIT_POLICY=PASSIVE`` unless set: it takes effect when OpenMP starts, so call this
    before the first torch computation). ``warn``: :func:`warn_if_oversubscribed` now."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cpus = available_cpus()
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else cpus
    import torch

    torch.set_num_threads(threads)
    if warn:
        warn_if_oversubscribed(threads)
    return threads


def warn_if_oversubscribed(threads: int | None = None) -> bool:
    """Says once per process when other processes already keep the available CPUs busy, so
    ``threads`` more would share them; returns whether it warned."""
    global _warned
    cpus = available_cpus()
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    busy = busy_cpus()
    if _warned or busy + threads <= 1.5 * cpus:
        return False
    _warned = True
    print(
        f"warning: {cpus} CPU(s) available and other processes keep about {busy:.0f} busy; "
        f"{threads} training thread(s) will be slowed by sharing them (set OMP_NUM_THREADS, "
        "or run fewer jobs at once)",
        file=sys.stderr,
    )
    return True
