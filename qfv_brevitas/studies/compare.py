"""The seed papers' methods side by side on the same model, data and maps.

:func:`compare_methods` runs a chosen set of methods over a list of :class:`Scenario` s (stuck-at
faults, transient bit flips, per-cell variability: normal or lognormal, with HRS leakage, with or
without a between-chip component) and ``trials`` seeded maps per scenario: trial ``k`` draws its
map (or flip stream) from seed ``seed + k`` for every method, so the methods are compared on the
same chips. It returns a :class:`~qfv_brevitas.studies.results.StudyResult` comparison: one
table (mean, std, min over the maps) and one plot.

The methods are those of the registry (:mod:`qfv_brevitas.studies.methods`, which lists the
library's own): a method that does not apply to a scenario's kind (one that adapts to a map,
under transient bit flips) is ``n/a`` there. Methods trained once are trained from the model
before any map is drawn and deployed naively, like ``none``. With
``CompareConfig.selftune_on_top`` every method is also reported after self-tuning
(``<method>+selftune``). All fine-tunes use ``CompareConfig.finetune``. The runner is
:func:`qfv_brevitas.studies.engine.run_study`.

:func:`compare_faults` and :func:`compare_variability` compare methods over the levels of one
kind instead (fault rates, sigma/mu): a sweep like those of
:mod:`qfv_brevitas.studies.montecarlo`, one line per method in its plot, without self-tuning on
top.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn
from torch.utils.data import Dataset

from qfv_brevitas.training.train import TrainConfig
from qfv_brevitas.studies.engine import CompareConfig, run_study
from qfv_brevitas.studies.methods import METHODS, check_methods
from qfv_brevitas.studies.montecarlo import run_sweep, sweep_config, variability_settings
from qfv_brevitas.studies.results import StudyResult
from qfv_brevitas.studies.scenario import Scenario, check_levels

__all__ = ["compare_methods", "compare_faults", "compare_variability", "FAULT_METHODS",
           "VARIABILITY_METHODS"]

#: Default methods of :func:`compare_faults` / :func:`compare_variability` (any registered
#: method that applies to the kind may be given).
FAULT_METHODS = ("none", "nearest_valid", "paper")
VARIABILITY_METHODS = ("none", "chip_in_loop", "paper")


def compare_methods(model: nn.Module, train: Dataset, test: Dataset,
                    scenario_list: Sequence[Scenario], methods: Sequence[str] = METHODS,
                    config: Optional[CompareConfig] = None, progress: bool = True,
                    workers: int = 1, distributed: bool = False, device=None
                    ) -> StudyResult:
    """Run ``methods`` on ``model`` over each scenario's ``config.trials`` seeded maps and
    collect test accuracies (``model`` itself is left unchanged: every run is on a copy).
    ``workers`` processes and/or the ranks of a ``torch.distributed`` group
    (``distributed=True``) share the maps (:mod:`qfv_brevitas.util.parallel`: the same rows as one
    process); ``device`` runs on a copy of the model there.

    Raises ValueError for an unknown method or scenario, or a model without N-multiplier
    layers. See the module docstring for the methods.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from qfv_brevitas import NMultConfig, quantize_model
    >>> torch.manual_seed(0) and None
    >>> m = quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(),
    ...                                  nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
    ...                    NMultConfig(act_bits=None))
    >>> data = TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 2, (32,)))
    >>> res = compare_methods(m, data, data, [Scenario("faults", 0.2)], ["none", "nearest_valid"],
    ...                       CompareConfig(trials=2, selftune_on_top=False), progress=False)
    >>> res.scenario_labels, res.methods, len(res.rows)
    (['ideal device', 'stuck-at 20%'], ['none', 'nearest_valid'], 6)
    """
    return run_study(model, train, test, scenario_list, methods, config, progress=progress,
                     workers=workers, distributed=distributed, device=device)


def compare_faults(model: nn.Module, train: Dataset, test: Dataset, rates: Sequence[float],
                   trials: int = 10, methods: Sequence[str] = FAULT_METHODS,
                   finetune: Optional[TrainConfig] = None,
                   remap_every: int = CompareConfig.remap_every, seed: int = 0,
                   sa1_fraction: float = 0.5, layers: str = "inner", progress: bool = True,
                   workers: int = 1, distributed: bool = False, device=None,
                   sam_rho: float = CompareConfig.sam_rho,
                   rbe_rate: float = CompareConfig.rbe_rate) -> StudyResult:
    """Each method on the same fault maps, e.g. ``none`` (naive deployment),
    ``nearest_valid`` (FAQ/Matic nearest-valid-level mapping), ``paper`` (eq. 11 fine-tune +
    remap every ``remap_every`` epochs, per map) and ``chip_in_loop`` (STE fine-tune through
    the faulty weights, per map): any registered method that applies to faults
    (:mod:`qfv_brevitas.studies.methods`). ``finetune`` defaults to
    :func:`~qfv_brevitas.studies.engine.default_finetune`; ``sam_rho`` is the SAM radius of
    ``saq``/``saq_aware``, ``rbe_rate`` the training bit-error rate of ``random_bit_error``
    (:class:`~qfv_brevitas.studies.engine.CompareConfig`); ``workers``, ``distributed``,
    ``device`` as in :func:`~qfv_brevitas.studies.montecarlo.evaluate_faults`."""
    methods = check_methods(methods, "faults", "fault method")
    levels = check_levels(rates, "fault rates", 1.0)
    cfg = sweep_config(trials, seed, layers, finetune, remap_every, sam_rho, rbe_rate)
    return run_sweep("faults", model, train, test, levels, {"sa1_fraction": sa1_fraction},
                     methods, cfg, {"sa1_fraction": sa1_fraction,
                                    "finetune_epochs": cfg.finetune.epochs,
                                    "remap_every": cfg.remap_every, "layers": layers},
                     "naive", progress, workers, distributed, device)


def compare_variability(model: nn.Module, train: Dataset, test: Dataset,
                        sigmas: Sequence[float], trials: int = 10,
                        methods: Sequence[str] = VARIABILITY_METHODS,
                        finetune: Optional[TrainConfig] = None, seed: int = 0,
                        hrs_on_off: Optional[float] = None, distribution: str = "normal",
                        layers: str = "inner", progress: bool = True, chip_sigma: float = 0.0,
                        layer_shared_sigma: float = 0.0, devices_per_chip: int = 1,
                        workers: int = 1, distributed: bool = False, device=None,
                        sam_rho: float = CompareConfig.sam_rho,
                        rbe_rate: float = CompareConfig.rbe_rate) -> StudyResult:
    """Each method on the same variability maps, e.g. ``none``, ``chip_in_loop`` and
    ``paper`` (eq. 12 fine-tune, deployed with aware mapping): any registered method that
    applies to variability; shared components as in
    :func:`~qfv_brevitas.studies.montecarlo.evaluate_variability`; ``finetune``, ``sam_rho``,
    ``rbe_rate`` as in :func:`compare_faults`; ``workers``, ``distributed``, ``device`` as in
    :func:`~qfv_brevitas.studies.montecarlo.evaluate_faults`."""
    methods = check_methods(methods, "variability", "variability method")
    levels = check_levels(sigmas, "sigmas", None)
    settings = variability_settings(hrs_on_off, distribution, chip_sigma, layer_shared_sigma,
                                    devices_per_chip)
    cfg = sweep_config(trials, seed, layers, finetune, sam_rho=sam_rho, rbe_rate=rbe_rate)
    return run_sweep("variability", model, train, test, levels, settings, methods, cfg,
                     dict(settings, finetune_epochs=cfg.finetune.epochs, layers=layers),
                     "naive", progress, workers, distributed, device)
