"""Machine description printed by every benchmark (shared by the scripts in this folder)."""
import os
import platform

import torch


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict:
    """Platform, CPUs, memory, torch version and threads, and the load average now."""
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_gib": None if mem_gib is None else round(mem_gib, 1),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "loadavg_start": _loadavg(),
    }


def machine_line() -> str:
    m = machine_info()
    return (f"Machine: {m['platform']}, {m['processor']}, cpu_count={m['cpu_count']}, "
            f"RAM {m['mem_total_gib']} GiB, python {m['python']}, torch {m['torch']}, "
            f"torch.get_num_threads()={m['torch_num_threads']}, "
            f"load average {m['loadavg_start']}")
