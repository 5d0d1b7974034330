"""Validators shared by every configuration and every reader of user input.

Each returns the checked value or raises :class:`~qfv_brevitas.util.errors.QfvError` (a
``ValueError``) with a message that names the setting (``what``) and what would be accepted.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, Iterable

from qfv_brevitas.util.errors import QfvError

__all__ = ["as_number", "check_choice", "check_fraction", "check_seed", "check_layer_dict",
           "check_positive_int"]


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
