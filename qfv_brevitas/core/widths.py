"""Bit widths: the limits and checks of the N-bit weight width and of the integer view's
fractional bits. No torch here: the ``qfv`` parser and the configs validate with these
without importing torch (``qfv --help`` stays fast)."""
from __future__ import annotations

import math
import numbers
from typing import Union

from qfv_brevitas.util.errors import QfvError

__all__ = ["MAX_BITS", "MAX_FRAC_BITS", "check_bits", "check_frac_bits"]

#: the widest N-bit code (levels are enumerated as 2**N codes)
MAX_BITS = 8
#: the most fractional bits of the integer view's grid ``2^-f``
MAX_FRAC_BITS = 20


def check_bits(bits, where: str = "quantizer") -> int:
    """Validate an N-bit width: an ``int`` in ``1..8`` (``MAX_BITS``)."""
    if not isinstance(bits, numbers.Real) and callable(getattr(bits, "item", None)):
        bits = bits.item()  # a one-element tensor
    if isinstance(bits, (bool, str, bytes)) or not isinstance(bits, numbers.Real) or \
            not math.isfinite(bits) or not float(bits).is_integer():
        raise QfvError(f"{where}: bit width must be an integer in 1..{MAX_BITS}, got {bits!r}")
    bits = int(bits)
    if not 1 <= bits <= MAX_BITS:
        raise QfvError(
            f"{where}: bit width must be in 1..{MAX_BITS}, got {bits}. N-multiplier levels are "
            f"enumerated as 2**N codes; use 1..{MAX_BITS} bits.")
    return bits


def check_frac_bits(frac_bits: Union[None, int, str], where: str = "frac_bits"
                    ) -> Union[None, int, str]:
    """``None`` (no integer view), ``"auto"`` or an integer in ``0..MAX_FRAC_BITS``."""
    if frac_bits is None or frac_bits == "auto":
        return frac_bits
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) \
            or not 0 <= frac_bits <= MAX_FRAC_BITS:
        raise QfvError(f"{where} must be None, 'auto' or an integer in 0..{MAX_FRAC_BITS}, "
                       f"got {frac_bits!r}")
    return int(frac_bits)
