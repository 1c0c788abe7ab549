"""What the benchmarks ran on (CPU, cores, memory, library versions, threads) and how peak memory is read."""
from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np
import torch


def _cpuinfo(field: str) -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _proc_kib(path: str, field: str) -> int:
    """A "Field:  <n> kB" line of a /proc file (/proc/meminfo, /proc/self/status), in KiB."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def describe_machine() -> dict[str, Any]:
    """CPU model, usable cores, RAM, load, versions and torch's thread counts of this process."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": _cpuinfo("model name"),
        "cpu_flags_avx512": "avx512f" in _cpuinfo("flags").split(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(_proc_kib("/proc/meminfo", "MemTotal") / 2**20, 1),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }


class PeakRss:
    """Peak resident memory of this process during a `with` block, in MiB, from Linux's VmHWM.

    On entry the high-water mark is reset to the current RSS (`/proc/self/clear_refs` "5"), so
    `peak_mib` is the largest RSS reached inside the block and `extra_mib` how far it rose above
    the RSS at entry (what the block itself needed: temporaries, the output, allocator growth).
    """

    MEMORY_METHOD = ("Linux /proc/self/status VmHWM (peak RSS) after resetting it via "
                     "/proc/self/clear_refs '5' at the start of each timed call, in a fresh subprocess; "
                     "extra = peak RSS - RSS before the call")

    def __enter__(self) -> PeakRss:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start_kib = _proc_kib("/proc/self/status", "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        peak_kib = _proc_kib("/proc/self/status", "VmHWM")
        self.peak_mib = peak_kib / 1024
        self.extra_mib = (peak_kib - self.start_kib) / 1024
