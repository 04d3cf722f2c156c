"""What every benchmark records about the machine it ran on (benchmarks/RESULTS.md cites it)."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import statistics
import time

import numpy as np
import torch


def machine_info(device: str = "cpu", packages: tuple[str, ...] = ()) -> dict:
    """Date, CPU model, cores, torch threads, versions (and of ``packages``, None where absent),
    and the GPU's name when ``device`` is a CUDA device."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for name in packages:
        try:
            info[name] = importlib.import_module(name).__version__
        except ImportError:
            info[name] = None
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def timed_with_result(fn, sync, reps: int = 1) -> tuple[float, object]:
    """The median wall time of ``reps`` calls of ``fn`` (``sync`` before and after each: the device's
    synchronize, or a no-op on the CPU) and the last call's result."""
    times, out = [], None
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def timed(fn, sync, reps: int = 1) -> float:
    """The median wall time of ``reps`` calls of ``fn``; see :func:`timed_with_result`."""
    return timed_with_result(fn, sync, reps)[0]
