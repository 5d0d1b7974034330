"""The public face is lazy: ``import qfv_brevitas`` imports no torch, and each public name is
there on first use."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={"PATH": "", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_import_loads_no_torch_and_every_public_name_resolves():
    out = _run("import sys, qfv_brevitas as q\n"
               "print(sorted(m for m in ('torch', 'brevitas', 'numpy') if m in sys.modules))\n"
               "missing = [n for n in q.__all__ if not hasattr(q, n)]\n"
               "print(missing, set(q.__all__) <= set(dir(q)))\n"
               "print('torch' in sys.modules, q.fit.__module__, q.QfvError.__module__)")
    first, second, third = out.splitlines()
    assert first == "[]"
    assert second == "[] True"
    assert third == "True qfv_brevitas.training.train qfv_brevitas.util.errors"


def test_an_unknown_name_is_an_attribute_error():
    import qfv_brevitas

    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        qfv_brevitas.fitt  # noqa: B018
    from qfv_brevitas import fit
    from qfv_brevitas.training.train import fit as home

    assert fit is home


def test_spiking_models_are_found_without_importing_the_snn_package_first():
    pytest.importorskip("spikingjelly")
    out = _run("import sys\nfrom qfv_brevitas.zoo.models import build_model\n"
               "print('qfv_brevitas.snn' in sys.modules)\n"
               "m = build_model('spiking_mlp', (1, 8, 8), 10, snn={'T': 2})\n"
               "print(type(m).__name__, 'qfv_brevitas.snn' in sys.modules)")
    before, after = out.splitlines()
    assert before == "False" and after.endswith(" True")
