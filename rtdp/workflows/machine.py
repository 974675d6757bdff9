"""The machine a measurement runs on: physical cores, CPU name, memory bandwidth measured on the spot."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def physical_cores() -> int:
    """Physical CPU cores available to this process (logical count when unknown)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return min(int(n), len(os.sched_getaffinity(0)))
    except (ImportError, AttributeError):
        pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def memory_bandwidth_gbs(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Copy bandwidth measured now (read + write bytes per second, best of ``repeats``), GB/s."""
    import torch

    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"


