"""One error base: every exception class the library defines is a
:class:`qfv_brevitas.util.errors.QfvError` (bad input, a ``ValueError``), unless it is listed
here with the reason it is not bad input."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from qfv_brevitas.chip.faults import FaultModel, sample_fault_map
from qfv_brevitas.util.errors import QfvError, QfvTypeError
from qfv_brevitas.util.validate import check_type

PKG = Path(__file__).resolve().parents[2] / "qfv_brevitas"

#: Exception classes that are not about bad input, with the built-in they must derive from.
NOT_BAD_INPUT = {
    # spikingjelly (an optional extra) is missing: the environment, not an argument, is at
    # fault; an ImportError as Python code expects around optional features.
    "qfv_brevitas.snn.neurons.SNNDependencyError": ImportError,
    # raised inside the worker thread that runs a file's graph to stop it, caught by the
    # deadline's own caller: never seen by a user
    "qfv_brevitas.export.deadline.Stopped": BaseException,
}


def _library_exceptions():
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mod = importlib.import_module(".".join(parts))
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) \
                    and obj.__module__ == mod.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_class_of_the_library_is_a_qfv_error():
    classes = _library_exceptions()
    # The walk finds the known ones (so an empty search cannot pass).
    for name in ("qfv_brevitas.chip.faults.FaultMapError", "qfv_brevitas.zoo.data.DataError",
                 "qfv_brevitas.core.preserve.ConversionError", "qfv_brevitas.studies.ptq.PTQError",
                 "qfv_brevitas.zoo.checkpoint.CheckpointError",
                 "qfv_brevitas.chip.variability.VariabilityMapError",
                 "qfv_brevitas.snn.neurons.SNNDependencyError"):
        assert name in classes, name
    stray = sorted(n for n, c in classes.items()
                   if not issubclass(c, QfvError) and n not in NOT_BAD_INPUT)
    assert not stray, f"exception classes that are not QfvError (nor listed as not bad input): " \
                      f"{stray}"
    for name, base in NOT_BAD_INPUT.items():
        assert issubclass(classes[name], base) and not issubclass(classes[name], QfvError)
        assert "Not a" in (classes[name].__doc__ or ""), f"{name} says why it is no QfvError"


def test_qfv_errors_are_value_errors_and_type_errors_stay_type_errors():
    assert issubclass(QfvError, ValueError)
    assert issubclass(QfvTypeError, QfvError) and issubclass(QfvTypeError, TypeError)
    with pytest.raises(TypeError, match="sample_fault_map takes a FaultModel, got dict") as e:
        sample_fault_map(None, {"rate": 0.1})
    assert isinstance(e.value, QfvTypeError)
    assert check_type(FaultModel(rate=0.1), FaultModel, "x") == FaultModel(rate=0.1)
