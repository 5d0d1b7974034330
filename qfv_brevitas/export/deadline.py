"""Running a graph with a deadline, interruptibly.

onnxruntime's ``InferenceSession.run`` and qonnx's ``execute_onnx`` are long C calls or long
loops the main thread would sit in: a signal's handler runs only between bytecodes, so Ctrl-C
or SIGTERM waits for the whole run. :func:`call_with_deadline` runs the work in a worker
thread instead and waits for it in short joins, during which the main thread sees a
``KeyboardInterrupt`` at once (``qfv`` turns SIGTERM into one). On the deadline or an
interrupt it stops the work: every ``onnxruntime.RunOptions`` the work registered with its
:class:`Stopper` gets ``terminate = True`` (onnxruntime checks it between nodes) and the
worker gets an asynchronous :class:`Stopped` exception (raised at its next bytecode: between
qonnx's nodes). The caller then sees :class:`ExecutionTimeout` (``qfv`` exit 4) or the
``KeyboardInterrupt`` (exit 130) within :data:`POLL_S` of it, after waiting at most
:data:`GRACE_S` for the worker to wind down (a worker still inside one node is left to finish
it as a daemon thread: its results are dropped).
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Any, Callable, List, Optional

from qfv_brevitas.export.errors import ExecutionTimeout

__all__ = ["DEFAULT_TIME_LIMIT_S", "POLL_S", "GRACE_S", "Stopped", "Stopper",
           "call_with_deadline"]

#: default time limit of running a file's graph (verification of the zoo's largest model on
#: 64 inputs stays well inside it; ``qfv verify --time-limit`` changes it)
DEFAULT_TIME_LIMIT_S = 600.0
#: how often the waiting thread looks at the clock and lets a signal in
POLL_S = 0.05
#: how long a stopped worker is waited for before the caller goes on without it
GRACE_S = 1.0


class Stopped(BaseException):
    """Raised inside the worker to stop it (a BaseException: no ``except Exception`` of the
    libraries it runs swallows it). Not a :class:`~qfv_brevitas.util.errors.QfvError`: it
    never leaves :func:`call_with_deadline`, which turns a stop into ``ExecutionTimeout`` or
    ``KeyboardInterrupt``."""


class Stopper:
    """What stops onnxruntime inside a running piece of work: the ``onnxruntime.RunOptions``
    it passes to ``InferenceSession.run`` (:meth:`options`)."""

    def __init__(self) -> None:
        self._options: List[Any] = []
        self._lock = threading.Lock()
        self.stopped = False

    def options(self):
        """A fresh ``onnxruntime.RunOptions`` that :meth:`stop` terminates (already
        terminated if the work was stopped)."""
        import onnxruntime as ort

        opts = ort.RunOptions()
        with self._lock:
            opts.terminate = self.stopped
            self._options.append(opts)
        return opts

    def stop(self) -> None:
        """Terminate every registered run (and every later one)."""
        with self._lock:
            self.stopped = True
            for opts in self._options:
                opts.terminate = True


class _Worker(threading.Thread):
    """Runs ``fn(stopper)`` and keeps its result or exception; :meth:`interrupt` raises
    :class:`Stopped` in it while ``fn`` still runs (never once it has returned)."""

    def __init__(self, fn: Callable[[Stopper], Any], stopper: Stopper):
        super().__init__(name="qfv-graph", daemon=True)
        self.fn, self.stopper = fn, stopper
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self._done = False
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            try:
                self.result = self.fn(self.stopper)
            except BaseException as e:  # handed to the waiting thread (Stopped: dropped)
                self.error = e
            finally:
                with self._lock:
                    self._done = True
        except Stopped:  # delivered just as fn returned
            pass

    def interrupt(self) -> None:
        with self._lock:
            if not self._done and self.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident),
                                                           ctypes.py_object(Stopped))


def _stop(worker: _Worker) -> None:
    worker.stopper.stop()
    worker.interrupt()
    worker.join(GRACE_S)


def call_with_deadline(fn: Callable[[Stopper], Any], seconds: Optional[float], what: str
                       ) -> Any:
    """``fn(stopper)`` run in a worker thread, stopped at ``seconds`` (None: no limit) with
    :class:`ExecutionTimeout` naming ``what``, or on ``KeyboardInterrupt`` in the calling
    thread (re-raised). ``fn`` passes ``stopper.options()`` to every onnxruntime run.

    >>> call_with_deadline(lambda stopper: 6 * 7, 5.0, "the answer")
    42
    """
    if seconds is not None and not seconds > 0:
        raise ValueError(f"a time limit is a positive number of seconds, got {seconds!r}")
    worker = _Worker(fn, Stopper())
    end = None if seconds is None else time.monotonic() + seconds
    worker.start()
    try:
        while worker.is_alive():
            left = POLL_S if end is None else end - time.monotonic()
            if left <= 0:
                _stop(worker)
                raise ExecutionTimeout(f"{what}: still running after the time limit of "
                                       f"{seconds:g} s; stopped (give a longer one with "
                                       "--time-limit, or time_limit=)")
            worker.join(min(POLL_S, left))
    except KeyboardInterrupt:
        _stop(worker)
        raise
    if worker.error is not None:
        raise worker.error
    return worker.result
