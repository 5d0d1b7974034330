"""The errors of the export layer, in one module that every part of it can import."""
from __future__ import annotations

from typing import Optional

from qfv_brevitas.util.errors import QfvError, VerificationError

__all__ = ["ExportError", "ExportVerificationError", "ExportFileError", "ExecutionTimeout"]


class ExportError(QfvError):
    """The model cannot be exported as asked (the message says how to fix the call)."""


class ExportVerificationError(ExportError, VerificationError):
    """The exported graph does not compute what the torch model computes; nothing was written.
    ``report`` is the :class:`~qfv_brevitas.export.verify.VerifyReport`."""

    def __init__(self, message: str, report: Optional[object] = None):
        super().__init__(message)
        self.report = report


class ExportFileError(QfvError):
    """A file that is not (or no longer) an export of this library."""


class ExecutionTimeout(QfvError):
    """Running a file's graph took longer than its time limit and was stopped
    (:func:`~qfv_brevitas.export.deadline.call_with_deadline`); nothing was written. ``qfv``
    exit 4, as for other resource limits met while working: the input may be fine on a faster
    machine or with a longer ``--time-limit``."""

    exit_code = 4
