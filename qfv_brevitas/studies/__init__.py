"""Whole studies over imperfect chips, and the experiments built on them.

One engine (:func:`run_study`) runs registered methods (:func:`register_method`) over
:class:`Scenario` s (stuck bits, variability, bit flips) and seeded maps, into one
:class:`StudyResult` (statistics, tables, files, plots). The entry points below are thin calls
into it. matplotlib is loaded only when a result draws its plot.
"""
from qfv_brevitas.studies.compare import compare_faults, compare_methods, compare_variability
from qfv_brevitas.studies.engine import CompareConfig, run_study
from qfv_brevitas.studies.methods import (method_names, random_bit_error_finetune,
                                          register_method, unregister_method)
from qfv_brevitas.studies.montecarlo import (evaluate_bitflips, evaluate_faults,
                                             evaluate_variability)
from qfv_brevitas.studies.results import StudyResult
from qfv_brevitas.studies.scenario import Scenario, edge_layers, scenarios

__all__ = ["run_study", "Scenario", "scenarios", "CompareConfig", "StudyResult",
           "register_method", "unregister_method", "method_names", "evaluate_faults",
           "evaluate_variability", "evaluate_bitflips", "compare_faults", "compare_variability",
           "compare_methods", "random_bit_error_finetune", "edge_layers"]
