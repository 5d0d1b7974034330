"""Monte Carlo trials spread over worker processes and over machines.

A Monte Carlo run is a list of independent tasks (one map or flip stream, one method): each is
seeded by its own trial number, so it gives the same result wherever it runs. :func:`run_tasks`
computes them

- in this process (``workers=1``, not distributed);
- in ``workers`` forked processes on this machine (a standard-library
  :class:`concurrent.futures.ProcessPoolExecutor`; Linux/macOS; each with one intra-op thread:
  the processes are the parallelism), the first failure raised with its task number;
- on the ranks of an initialised ``torch.distributed`` process group (``distributed=True``,
  e.g. under ``torchrun``, the launcher of DDP training): rank ``r`` takes tasks ``r, r + W,
  ...`` (and may fork ``workers`` of its own), and every rank receives all results
  (``all_gather_object``);

and returns the results in task order, so the rows, tables and files are identical to a
single-process run with one intra-op thread (reductions inside torch ops are split by thread
count, so other thread counts agree to float rounding only).
"""
from __future__ import annotations

import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from qfv_brevitas.util.progress import RunProgress
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.validate import check_count

__all__ = ["run_tasks", "init_distributed", "check_workers"]


def check_workers(workers: Any) -> int:
    """``workers`` (processes on this machine) as an int >= 1."""
    return check_count(workers, "workers", hint=" (processes on this machine)")


def init_distributed(backend: Optional[str] = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); gloo on CPUs, nccl with CUDA. Returns
    whether this process is one of several ranks (False without torchrun's variables)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return dist.get_world_size() > 1


def _shard(n: int, distributed: bool) -> List[int]:
    if not distributed:
        return list(range(n))
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise QfvError("distributed=True needs an initialised torch.distributed process group "
                       "(run under torchrun and call qfv_brevitas.util.parallel.init_distributed() "
                       "or torch.distributed.init_process_group first)")
    rank, world = dist.get_rank(), dist.get_world_size()
    return list(range(rank, n, world))


def _local(tasks: Sequence[int], fn: Callable[[int], Any], workers: int,
           bar: Optional[RunProgress]) -> Dict[int, Any]:
    """``{i: fn(i)}`` for ``tasks``: in this process, or over ``workers`` forked processes."""
    if workers <= 1 or len(tasks) <= 1:
        out = {}
        for i in tasks:
            out[i] = fn(i)
            if bar is not None:
                bar.update(1)
        return out
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        raise QfvError("workers > 1 needs the 'fork' start method (Linux, macOS); on this "
                       "system run the trials in one process, or over ranks with torchrun")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise QfvError("workers > 1 cannot fork a process that uses CUDA; launch one process "
                       "per GPU with torchrun instead (distributed=True)")
    # Fork, not spawn: ``fn`` is a closure over the study's models, data and maps (run_study's
    # trial), which spawn would have to pickle and could not. A forked worker inherits it as
    # its initializer's argument (fork pickles no process arguments); only task numbers go to
    # the workers and plain results come back.
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("fork"),
                               initializer=_start_worker, initargs=(fn,))
    out: Dict[int, Any] = {}
    try:
        futures = {pool.submit(_run_task, i): i for i in tasks}
        for done in as_completed(futures):
            out[futures[done]] = done.result()  # a failed task raises here, the first to end
            if bar is not None:
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


#: The task function of this worker process (set once, by :func:`_start_worker`).
_task_fn: Optional[Callable[[int], Any]] = None


def _start_worker(fn: Callable[[int], Any]) -> None:
    """Set up a worker: one intra-op thread (the processes are the parallelism, and results
    then equal a one-thread single-process run) and the task function."""
    global _task_fn
    torch.set_num_threads(1)
    _task_fn = fn


def _run_task(i: int) -> Any:
    """``fn(i)`` in a worker; a failure comes back as a RuntimeError that names the task and
    carries the worker's traceback (the parent's own traceback would not show where)."""
    try:
        return _task_fn(i)
    except BaseException:
        raise RuntimeError(f"a Monte Carlo worker failed on task {i}:\n"
                           f"{traceback.format_exc()}") from None


def run_tasks(n: int, fn: Callable[[int], Any], workers: int = 1, distributed: bool = False,
              progress: Optional[RunProgress] = None) -> List[Any]:
    """``[fn(0), ..., fn(n - 1)]``, computed as the module docstring says. ``fn`` must be
    deterministic given its task number; its result must pickle (plain data)."""
    workers = check_workers(workers)
    mine = _shard(n, distributed)
    local = _local(mine, fn, workers, progress)
    if distributed:
        import torch.distributed as dist

        parts: List[Dict[int, Any]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(parts, local)
        for p in parts:
            local.update(p)
    return [local[i] for i in range(n)]
