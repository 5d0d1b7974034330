"""How many intra-op threads a job should use.

A small model (the digits demo: 8x8 images, a few thousand weights per layer) runs thousands
of tiny torch ops per epoch. Splitting each over several threads costs more in waiting than it
saves, and when other processes hold the cores every op waits for its slowest thread: measured
here, a digits epoch went from 0.17 s to 32 s with a few other jobs on 2 cores at 2 threads.
:func:`auto_threads` gives such a model one thread and leaves larger ones at torch's default
(one per core); ``qfv --threads N`` overrides it (``BENCHMARKS.md``, "Threads").
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from qfv_brevitas.util.errors import QfvError

__all__ = ["SMALL_STEP_MACS", "forward_macs", "auto_threads", "set_threads", "parse_threads",
           "max_threads", "cores", "MAX_THREADS"]

#: Below this many multiply-accumulates per forward pass of a training batch, one thread.
SMALL_STEP_MACS = 50_000_000
#: The most threads (or worker processes) one job takes, whatever the machine: beyond it
#: OpenMP's per-thread buffers alone run out of memory (``--threads 1000000`` aborted the
#: process in libgomp) long before any speed is gained.
MAX_THREADS = 1024


def cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_threads() -> int:
    """The most threads a job may ask for: 4 per core (more only wait for each other), at
    most :data:`MAX_THREADS`."""
    return max(1, min(MAX_THREADS, 4 * cores()))


def forward_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of the matrix products and convolutions in one forward pass of
    ``example`` (torch's :class:`~torch.utils.flop_counter.FlopCounterMode` counts them as two
    FLOPs each; the model's mode is kept).

    >>> forward_macs(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), torch.zeros(3, 8))
    120
    """
    counter = FlopCounterMode(display=False)
    was = model.training
    try:
        model.eval()
        # With gradients on: the counter's module tracker hooks the autograd graph of every
        # module's inputs and fails under no_grad on a module fed a parameter (Brevitas'
        # weight quantizers are). One example's graph is small and dropped on return.
        with torch.enable_grad(), counter:
            model(example)
    finally:
        model.train(was)
    return counter.get_total_flops() // 2


def auto_threads(model: nn.Module, example: Tensor, batch_size: Optional[int] = None) -> int:
    """1 for a model whose forward pass over a batch of ``batch_size`` (default: the example's
    own) costs fewer than :data:`SMALL_STEP_MACS` multiply-accumulates, else torch's current
    setting (one per core unless changed)."""
    n = int(example.shape[0]) or 1
    macs = forward_macs(model, example[:1]) * (batch_size or n)
    return 1 if macs < SMALL_STEP_MACS else torch.get_num_threads()


def parse_threads(text: Union[str, int, None]) -> Optional[int]:
    """``"auto"``/``None`` -> ``None``; a positive integer (as text or int) up to
    :func:`max_threads` -> that integer; anything else an error naming ``--threads``."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise QfvError(f"--threads must be 'auto' or an integer >= 1, got {text!r}")
    top = max_threads()
    if n > top:
        raise QfvError(f"--threads {text} is more than this machine can use: at most {top} "
                       f"(4 per core, {cores()} cores; {MAX_THREADS} on any machine)")
    return n


def set_threads(n: int) -> int:
    """``torch.set_num_threads(n)``; returns the previous setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    return old
