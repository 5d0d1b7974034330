"""Build step of the optional CPU kernels (everything else is in pyproject.toml).

``qfv_brevitas/csrc/kernels.c`` is plain C (no Python or torch headers), compiled into the
package and loaded with ctypes by ``qfv_brevitas/core/kernels.py``. It is optional: without a C
compiler the build skips it and the package uses its pure-torch code paths.
"""
import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    ext_modules = []  # pthreads and GCC attributes: the torch paths serve Windows
else:
    ext_modules = [Extension(
        "qfv_brevitas._qfv_kernels", ["qfv_brevitas/csrc/kernels.c"],
        extra_compile_args=["-O3", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off"],
        extra_link_args=["-pthread"], optional=True)]

setup(ext_modules=ext_modules)
