"""ctypes bindings of the optional CPU kernels in ``csrc/kernels.c``.

The kernels do the nearest-level search, the squared-distance regularizer (forward and
backward) and their device-aware forms in one pass over the weights each, with threads taking
chunks of work from a shared counter. Compared with the blocked torch code they replace on the
CPU, they launch one parallel region per call instead of several per cache-sized block, which
is what keeps them near their idle speed when other processes share the cores
(``BENCHMARKS.md``, "Kernels under load").

They are built by ``pip install`` when a C compiler is there (``setup.py``, optional); without
them, or with ``QFV_KERNELS=torch`` (or ``0``, ``off``) in the environment, or inside
:func:`torch_fallback`, the library uses its pure-torch paths, which give the same results up to float rounding (the
kernels add in double precision). CUDA tensors always take the torch paths.

The library never calls these bindings from a model's forward or its regularizer directly:
each kernel is the CPU implementation of a torch custom op (``qfv::nearest``,
``qfv::nearest_backward`` in :mod:`qfv_brevitas.core.search`; ``qfv::aware_fused``,
``qfv::deployed``, ``qfv::deployed_backward``, ``qfv::scale`` in
:mod:`qfv_brevitas.core.device`) whose other implementation is the torch path, chosen by
:func:`usable` when the op runs. The ops have fake implementations and registered autograd,
so torch.compile and torch.export trace them as single nodes.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["available", "enabled", "torch_fallback", "usable", "BLOCK", "setting_error",
           "KERNELS_ON", "KERNELS_OFF"]

#: Weights per chunk (one piece of one row); several chunks per thread balance the load.
BLOCK = 1 << 16

#: Version of the kernels' C interface this module expects (``qfv_abi_version`` in kernels.c).
_ABI = 2

#: ``QFV_KERNELS`` values (any case): the compiled kernels where built (also unset), or not
KERNELS_ON = ("", "1", "on", "yes", "true", "kernels")
KERNELS_OFF = ("0", "off", "no", "false", "torch")


def _setting(value: str) -> Tuple[bool, Optional[str]]:
    """``(enabled, problem)`` of a ``QFV_KERNELS`` value: an unknown one is no setting at all
    (a typo of "torch" must not run the kernels it meant to rule out), so the torch paths,
    and a problem the command line refuses to start with (the library warns once)."""
    v = value.strip().lower()
    if v in KERNELS_ON:
        return True, None
    if v in KERNELS_OFF:
        return False, None
    shown = value if value.isprintable() and len(value) <= 40 else repr(value[:40])
    return False, (f"QFV_KERNELS={shown} is not a setting: use 1 or on (the compiled kernels "
                   "where built, the default) or 0, off or torch (the pure-torch paths)")


_LIB: Optional[ctypes.CDLL] = None
_LOAD_ERROR: Optional[str] = None
_ENABLED, _SETTING_ERROR = _setting(os.environ.get("QFV_KERNELS", ""))
_WARNED = False


def setting_error() -> Optional[str]:
    """Why ``QFV_KERNELS`` (as the environment holds it now) is not understood; None if it is,
    or is unset. ``qfv`` asks before any work and refuses to start with such a value."""
    return _setting(os.environ.get("QFV_KERNELS", ""))[1]


def _load() -> Optional[ctypes.CDLL]:
    global _LIB, _LOAD_ERROR
    if _LIB is not None or _LOAD_ERROR is not None:
        return _LIB
    try:
        spec = importlib.util.find_spec("qfv_brevitas._qfv_kernels")
        if spec is None or not spec.origin:
            raise ImportError("not built (no C compiler when the package was installed?)")
        lib = ctypes.CDLL(spec.origin)
        if lib.qfv_abi_version() != _ABI:
            raise ImportError("built from another version of kernels.c: reinstall the package")
    except (ImportError, OSError, AttributeError) as e:
        _LOAD_ERROR = str(e)
        return None
    P, I, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suf in ("f32", "f64"):
        f = getattr(lib, f"qfv_nearest_{suf}")
        f.argtypes = [P, I, I, P, I, P, P, P, P, I, I]
        f.restype = I
        f = getattr(lib, f"qfv_nearest_bwd_{suf}")
        f.argtypes = [P, P, I, I, P, I, D, P, P, I, I]
        f.restype = I
        f = getattr(lib, f"qfv_deployed_{suf}")
        f.argtypes = [P, I, I, I, P, P, P, P, P, ctypes.c_int, D, P, P, P, I, I]
        f.restype = I
        f = getattr(lib, f"qfv_aware_fused_{suf}")
        f.argtypes = [P, I, I, I, P, P, P, P, P, P, P, P, P, P, P, P, I, I]
        f.restype = I
        f = getattr(lib, f"qfv_scale_{suf}")
        f.argtypes = [P, I, D, P, I, I]
        f.restype = I
    _LIB = lib
    return lib


def available() -> bool:
    """Whether the compiled kernels could be loaded."""
    return _load() is not None


def load_error() -> Optional[str]:
    """Why the kernels could not be loaded (``None`` if they were)."""
    _load()
    return _LOAD_ERROR


def enabled() -> bool:
    """Whether CPU tensors go through the compiled kernels now (warns once where
    ``QFV_KERNELS`` held no setting: the torch paths then)."""
    global _WARNED
    if _SETTING_ERROR is not None and not _WARNED:
        _WARNED = True
        warnings.warn(_SETTING_ERROR + "; using the pure-torch paths", RuntimeWarning,
                      stacklevel=2)
    return _ENABLED and available()


@contextlib.contextmanager
def torch_fallback():
    """Use the pure-torch paths inside this block (to compare both, or to rule the kernels
    out)."""
    global _ENABLED
    old = _ENABLED
    _ENABLED = False
    try:
        yield
    finally:
        _ENABLED = old


def usable(*tensors: Optional[Tensor]) -> bool:
    """True if the kernels take these tensors: CPU, float32/float64 (float ones all of the
    same dtype), and the kernels loaded and enabled."""
    if not enabled():
        return False
    dtype = None
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            return False
        if t.is_floating_point():
            if t.dtype not in (torch.float32, torch.float64):
                return False
            if dtype is None:
                dtype = t.dtype
            elif t.dtype != dtype:
                return False
    return True


def _p(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _suf(t: Tensor) -> str:
    return "f32" if t.dtype == torch.float32 else "f64"


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check(rc: int, what: str) -> None:
    if rc == -1:
        raise MemoryError(f"{what}: out of memory for the kernel's per-chunk sums")
    if rc < 0:
        raise ValueError(f"{what}: bad arguments (code {rc})")


def nearest(w2d: Tensor, thr: Tensor, vals: Tensor, with_total: bool,
            perm: Optional[Tensor] = None) -> Tuple[Tensor, Optional[float], int]:
    """Sorted index (uint8, ``(G, M)``) of each weight's nearest level (with ``perm``, the
    ``(G, L)`` codes of the sorted levels: its code), ``sum (w - q)^2`` (a float, if
    ``with_total``) and the number of non-finite weights."""
    if perm is not None:
        perm = perm.to(torch.uint8).contiguous()
    w2d, thr, vals = w2d.contiguous(), thr.contiguous(), vals.contiguous()
    G, M = w2d.shape
    idx = torch.empty((G, M), dtype=torch.uint8)
    total = ctypes.c_double(0.0)
    fn = getattr(_LIB, f"qfv_nearest_{_suf(w2d)}")
    rc = fn(w2d.data_ptr(), G, M, thr.data_ptr(), thr.shape[1], vals.data_ptr(), _p(perm),
            idx.data_ptr(),
            ctypes.byref(total) if with_total else None, BLOCK, _threads())
    _check(rc, "nearest-level search")
    return idx, (total.value if with_total else None), int(rc)


def nearest_backward(w2d: Tensor, idx: Tensor, vals: Tensor, gw: float, want_w: bool,
                     want_sums: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``gw * (w - q)`` and the per-(row, sorted level) sums of ``w - q`` (float64)."""
    w2d, idx, vals = w2d.contiguous(), idx.contiguous(), vals.contiguous()
    G, M = w2d.shape
    grad = torch.empty_like(w2d) if want_w else None
    sums = torch.empty((G, vals.shape[1]), dtype=torch.float64) if want_sums else None
    fn = getattr(_LIB, f"qfv_nearest_bwd_{_suf(w2d)}")
    _check(fn(w2d.data_ptr(), idx.data_ptr(), G, M, vals.data_ptr(), vals.shape[1], float(gw),
              _p(grad), _p(sums), BLOCK, _threads()), "regularizer backward")
    return grad, sums


def deployed(w2d: Tensor, levels: Tensor, r: Tensor, codes: Tensor, lrs: Optional[Tensor],
             hrs: Optional[Tensor], backward: bool = False, gw: float = 0.0,
             want_w: bool = False, want_sums: bool = False):
    """Forward: ``sum (w - v)^2`` (a float) for the deployed values ``v`` of ``codes``.
    Backward: ``(gw * (w - v), sums)`` with sums ``(G, N + 1)`` float64: per row
    ``sum (w - v) coef_i`` and, last, ``sum (w - v)``."""
    c = [None if t is None else t.contiguous() for t in (w2d, levels, r, codes, lrs, hrs)]
    w2d, levels, r, codes, lrs, hrs = c
    G, M = w2d.shape
    N = r.shape[1]
    fn = getattr(_LIB, f"qfv_deployed_{_suf(w2d)}")
    if not backward:
        total = ctypes.c_double(0.0)
        _check(fn(w2d.data_ptr(), G, M, N, levels.data_ptr(), r.data_ptr(), codes.data_ptr(),
                  _p(lrs), _p(hrs), 0, 0.0, None, None, ctypes.byref(total), BLOCK, _threads()),
               "device-aware regularizer")
        return total.value
    grad = torch.empty_like(w2d) if want_w else None
    sums = torch.empty((G, N + 1), dtype=torch.float64) if want_sums else None
    _check(fn(w2d.data_ptr(), G, M, N, levels.data_ptr(), r.data_ptr(), codes.data_ptr(),
              _p(lrs), _p(hrs), 1, float(gw), _p(grad), _p(sums), None, BLOCK, _threads()),
           "device-aware regularizer backward")
    return grad, sums


def aware_fused(w2d: Tensor, levels: Tensor, r: Tensor, thr: Optional[Tensor],
                perm: Optional[Tensor], sa0: Optional[Tensor], sa1: Optional[Tensor],
                lrs: Optional[Tensor], hrs: Optional[Tensor], want_codes: bool = False,
                want_resid: bool = False, want_sums: bool = False):
    """Device-aware regularizer in one pass: each weight's nearest deployable code and
    ``sum (w - v)^2`` over the deployed values ``v`` of those codes. Returns ``(total, bad,
    codes, resid, sums)``: the sum (a float), the number of non-finite weights, and if asked
    the uint8 codes ``(G, M)``, the residuals ``w - v`` ``(G, M)`` and the per-row float64 sums
    ``(G, N + 1)`` of ``(w - v) coef_i`` and, last, of ``w - v``. Without variability ``thr``
    and ``perm`` are the sorted thresholds and the sorted levels' codes."""
    c = [None if t is None else t.contiguous() for t in (w2d, levels, r, thr, sa0, sa1, lrs,
                                                           hrs)]
    w2d, levels, r, thr, sa0, sa1, lrs, hrs = c
    if perm is not None:
        perm = perm.to(torch.uint8).contiguous()
    G, M = w2d.shape
    N = r.shape[1]
    codes = torch.empty((G, M), dtype=torch.uint8) if want_codes else None
    resid = torch.empty_like(w2d) if want_resid else None
    sums = torch.empty((G, N + 1), dtype=torch.float64) if want_sums else None
    total = ctypes.c_double(0.0)
    fn = getattr(_LIB, f"qfv_aware_fused_{_suf(w2d)}")
    rc = fn(w2d.data_ptr(), G, M, N, levels.data_ptr(), r.data_ptr(), _p(thr), _p(perm),
            _p(sa0), _p(sa1), _p(lrs), _p(hrs), _p(codes), _p(resid), _p(sums),
            ctypes.byref(total), BLOCK // 4, _threads())
    _check(rc, "device-aware regularizer")
    return total.value, int(rc), codes, resid, sums


def scale(x: Tensor, s: float) -> Tensor:
    """``x * s`` (in ``x``'s dtype) on the kernels' thread pool."""
    x = x.contiguous()
    out = torch.empty_like(x)
    fn = getattr(_LIB, f"qfv_scale_{_suf(x)}")
    _check(fn(x.data_ptr(), x.numel(), float(s), out.data_ptr(), BLOCK, _threads()), "scale")
    return out
