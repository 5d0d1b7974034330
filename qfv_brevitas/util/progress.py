"""One progress display per run: a bar on a terminal, plain log lines elsewhere.

A long run (``qfv demo`` / ``qfv train``: a float model and several QAT models; a Monte Carlo)
gets one :class:`RunProgress` over all its steps, so a person sees one bar with the rate and
the time left for the whole run, and the phase it is in. On a terminal it is a tqdm bar. When
stderr is not a terminal (a log file, CI, ``nohup``) it writes a plain line at most every
``log_every`` seconds and one when each phase ends, with no carriage returns.

>>> p = RunProgress(total=4, desc="demo", enabled=False)
>>> p.update(2); p.done
2
>>> p.close()
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["RunProgress", "format_seconds"]


def format_seconds(s: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour).

    >>> format_seconds(3725.2), format_seconds(59)
    ('1:02:05', '0:59')
    """
    s = int(round(max(s, 0.0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class RunProgress:
    """Progress over ``total`` steps of a run (``unit``: what a step is, e.g. ``"batch"``).

    ``set_phase(name)`` names the part of the run now going (e.g. ``"nmult W4A4"``);
    ``update(n, **info)`` counts steps and shows ``info`` (loss, accuracy) beside the bar.
    ``enabled=False`` shows nothing; ``tty=None`` asks ``file.isatty()``. ``brief=True`` is for
    a run of a few steps that is often over in a moment (an export, a PTQ): nothing is shown
    in its first seconds (the bar after 2 s, plain lines once it has run ``log_every``), so
    a quick run, or an error a moment in, prints only its own result.
    """

    def __init__(self, total: int, desc: str = "", unit: str = "batch", enabled: bool = True,
                 file: Optional[TextIO] = None, tty: Optional[bool] = None,
                 log_every: float = 30.0, brief: bool = False):
        self.total = max(int(total), 0)
        self.desc = desc
        self.phase = ""
        self.unit = unit
        self.enabled = bool(enabled)
        self.file = file if file is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.file, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.log_every = float(log_every)
        self.done = 0
        self.info: dict = {}
        self.t0 = time.monotonic()
        self._last_log = self.t0
        self._bar = None
        self.brief = bool(brief)
        if self.enabled and self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.file,
                             dynamic_ncols=True, mininterval=0.5, smoothing=0.1,
                             delay=2.0 if brief else 0.0)

    # -- updates ---------------------------------------------------------------------------
    def set_phase(self, phase: str) -> None:
        """Start a named part of the run (a line in a log when the previous one ended)."""
        if self.phase and not self.tty and self.enabled:
            self._log(f"{self.phase} done")
        self.phase = phase
        if self._bar is not None:
            self._bar.set_description(f"{self.desc}: {phase}" if self.desc else phase)

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if info:
            self.info.update(info)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix(self.info, refresh=False)
        elif time.monotonic() - self._last_log >= self.log_every:
            self._log()

    def set_info(self, **info) -> None:
        """Show ``info`` beside the bar without counting a step."""
        self.info.update(info)
        if self._bar is not None and self.enabled:
            self._bar.set_postfix(self.info, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and (self.done or self.phase):
            self._log("done" if not self.phase else f"{self.phase} done")

    def __enter__(self) -> "RunProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plain lines -------------------------------------------------------------------------
    def rate(self) -> float:
        """Steps per second so far."""
        dt = time.monotonic() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def line(self, note: str = "") -> str:
        """The log line: where the run is, rate, elapsed and estimated time left."""
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 and self.total else None
        parts = [p for p in (self.desc, self.phase) if p]
        head = ": ".join(parts) if parts else "progress"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        txt = (f"{head}: {self.done}/{self.total} {self.unit}es{pct}" if self.unit.endswith("ch")
               else f"{head}: {self.done}/{self.total} {self.unit}s{pct}")
        txt += f", {rate:.1f} {self.unit}/s, elapsed {format_seconds(time.monotonic() - self.t0)}"
        if left is not None:
            txt += f", ETA {format_seconds(left)}"
        if self.info:
            txt += ", " + " ".join(f"{k}={v}" for k, v in self.info.items())
        if note:
            txt += f" [{note}]"
        return txt

    def _log(self, note: str = "") -> None:
        if self.brief and time.monotonic() - self.t0 < self.log_every:
            return  # a brief run that is still young: its result says it all
        self._last_log = time.monotonic()
        print(f"[qfv] {self.line(note)}", file=self.file, flush=True)
