"""Validators shared by every configuration and every reader of user input.

Each returns the checked value or raises :class:`~qfv_brevitas.util.errors.QfvError` (a
``ValueError``) with a message that names the setting (``what``) and what would be accepted.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Dict, Iterable

from qfv_brevitas.util.errors import QfvError, QfvTypeError

__all__ = ["as_number", "check_choice", "check_fraction", "check_seed", "check_layer_dict",
           "check_positive_int", "check_int", "check_count", "check_real", "check_type"]


def as_number(value: Any) -> float:
    """``value`` as a float, or NaN if it is not a number (bools and strings are not)."""
    if isinstance(value, (bool, str, bytes)):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return float("nan")


def check_choice(value: Any, choices: Iterable[str], what: str) -> str:
    """``value`` if it is one of ``choices``, else an error listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise QfvError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_fraction(value: Any, what: str, hint: str = "") -> float:
    """``value`` as a float in ``[0, 1]``."""
    x = as_number(value)
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise QfvError(f"{what} must be a number in [0, 1]{hint}, got {value!r}")
    return x


def check_seed(seed: Any, what: str) -> int:
    """``seed`` as a Python int (floats and bools are refused: they hide typos)."""
    if isinstance(seed, bool):
        raise QfvError(f"{what} must be an integer, got {seed!r}")
    try:
        return operator.index(seed)
    except TypeError:
        raise QfvError(f"{what} must be an integer, got {seed!r}") from None


def check_positive_int(value: Any, what: str) -> int:
    """``value`` as a Python int >= 1 (floats and bools are refused)."""
    n = check_seed(value, what)
    if n < 1:
        raise QfvError(f"{what} must be >= 1, got {value!r}")
    return n


def check_int(value: Any, what: str, minimum: int = 0) -> int:
    """``value`` as a Python int >= ``minimum`` (floats and bools are refused), e.g.
    ``TrainConfig.epochs``.

    >>> check_int(3, "epochs", 1)
    3
    >>> check_int(2.0, "epochs")
    Traceback (most recent call last):
    ...
    qfv_brevitas.util.errors.QfvError: epochs must be an integer, got 2.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise QfvError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise QfvError(f"{what} must be >= {minimum}, got {value!r}")
    return int(value)


def check_count(value: Any, what: str, minimum: int = 1, hint: str = "") -> int:
    """``value`` as a Python int >= ``minimum``: a count of things (workers, passes, inputs),
    where an integral float is accepted and a bool, a string or a fraction is not. ``hint``
    follows the bound in the message.

    >>> check_count(2.0, "workers")
    2
    >>> check_count(0, "workers", hint=" (processes on this machine)")
    Traceback (most recent call last):
    ...
    qfv_brevitas.util.errors.QfvError: workers must be an integer >= 1 (processes on this machine), got 0
    """
    x = as_number(value)
    if not (math.isfinite(x) and x.is_integer() and x >= minimum):
        raise QfvError(f"{what} must be an integer >= {minimum}{hint}, got {value!r}")
    return int(value)


def check_real(value: Any, what: str, minimum: float = 0.0, strict: bool = False,
               hint: str = "") -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` with ``strict``); bools and
    strings are refused. ``hint`` (e.g. ``" (the SAM radius, e.g. 0.05)"``) follows the bound
    in the message.

    >>> check_real(0.05, "TrainConfig.sam_rho")
    0.05
    >>> check_real(-1, "TrainConfig.lr", strict=True)
    Traceback (most recent call last):
    ...
    qfv_brevitas.util.errors.QfvError: TrainConfig.lr must be a finite number > 0, got -1
    """
    x = as_number(value)
    if not (math.isfinite(x) and (x > minimum if strict else x >= minimum)):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise QfvError(f"{what} must be a finite number {bound}{hint}, got {value!r}")
    return x


def check_type(value: Any, cls: type, what: str) -> Any:
    """``value`` if it is a ``cls``, else a :class:`~qfv_brevitas.util.errors.QfvTypeError`
    (``"{what} takes a {cls}, got {type}"``)."""
    if not isinstance(value, cls):
        raise QfvTypeError(f"{what} takes a {cls.__name__}, got {type(value).__name__}")
    return value


def check_layer_dict(d: Any, what: str, check: Callable[[Any, str], Any]) -> Dict[str, Any]:
    """A ``{layer name: value}`` dict with string keys, each value passed through ``check``."""
    if not isinstance(d, dict):
        raise QfvError(f"{what} must be a dict {{layer name: value}}, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise QfvError(f"{what} keys must be layer names (str) as in "
                           f"model.named_modules(), got {k!r}")
        out[k] = check(v, f"{what}[{k!r}]")
    return out
