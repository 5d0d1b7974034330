"""Machine description printed by every benchmark (shared by the scripts in this folder)."""
import os
import platform

import torch


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_line() -> str:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return (f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"cpu_count={os.cpu_count()}, RAM {mem} GiB, python {platform.python_version()}, "
            f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}, "
            f"load average {_loadavg()}")
