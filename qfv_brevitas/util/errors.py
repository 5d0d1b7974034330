"""The library's error classes for bad input, with the ``qfv`` exit status of each.

Every error the library raises for something the caller can fix (an argument, a file, a data
set) is a :class:`QfvError`, itself a ``ValueError`` so that ``except ValueError`` keeps working.
``qfv`` prints its message on one line and exits with its :attr:`~QfvError.exit_code`.
"""
from __future__ import annotations

__all__ = ["QfvError", "QfvTypeError", "OutputError", "VerificationError"]


class QfvError(ValueError):
    """Bad input: an argument, a file or a data set that the message names. ``qfv`` exit 2."""

    exit_code = 2


class QfvTypeError(QfvError, TypeError):
    """An argument of the wrong type (e.g. a dict where a ``FaultModel`` is expected): bad input
    like any :class:`QfvError`, and a ``TypeError`` as Python code expects. ``qfv`` exit 2."""


class OutputError(QfvError):
    """An output that must not or cannot be written as asked: it exists (pass ``--force`` /
    ``overwrite=True``), it is one of the inputs, or its folder is not writable. Nothing was
    written. ``qfv`` exit 3."""

    exit_code = 3


class VerificationError(QfvError):
    """A check ran and found a difference (e.g. an exported file that does not compute what
    the torch model computes); nothing was written. ``qfv`` exit 1."""

    exit_code = 1
