"""Monte Carlo sweeps over the levels of one kind of imperfect chip: the accuracy of a model
as it is deployed (no training), and the sweep that :mod:`qfv_brevitas.studies.compare` also
runs to compare trained methods over the same levels (:func:`run_sweep`).

Every trial draws its own seeded map (trial ``k`` uses ``seed + k`` at every level, so that the
methods and the levels are compared on the same maps: common random numbers). Results are
rows ``(method, level, trial, seed, acc)`` with summaries (mean, std, min), CSV/JSON and a plot
of accuracy against the fault rate, sigma/mu or bit-error rate, one line per method, error
bars = std (a :class:`~qfv_brevitas.studies.results.StudyResult`).

Each function is a thin call into the study engine (:func:`qfv_brevitas.studies.engine.run_study`)
with one :class:`~qfv_brevitas.studies.scenario.Scenario` per level; the rows are method
``none`` (naive deployment) or ``nearest_valid`` (aware), of the registry
(:mod:`qfv_brevitas.studies.methods`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch import nn
from torch.utils.data import Dataset

from qfv_brevitas.training.train import TrainConfig
from qfv_brevitas.studies.engine import CompareConfig, default_finetune, run_study
from qfv_brevitas.studies.results import StudyResult
from qfv_brevitas.studies.scenario import Scenario, check_levels
from qfv_brevitas.util.validate import check_choice

__all__ = ["evaluate_faults", "evaluate_variability", "evaluate_bitflips", "run_sweep",
           "sweep_config", "variability_settings"]


def run_sweep(kind: str, model: nn.Module, train: Optional[Dataset], test: Dataset,
              levels: List[float], settings: dict, methods: Sequence[str], cfg: CompareConfig,
              meta: dict, mapping: str, progress: bool, workers: int, distributed: bool,
              device) -> StudyResult:
    """A study of ``kind`` with one :class:`Scenario` (of ``settings``) per level: what the
    sweeps here and those of :mod:`qfv_brevitas.studies.compare` run."""
    scs = [Scenario(kind, level, **settings) for level in levels]
    return run_study(model, train, test, scs, methods, cfg, kind=kind, mapping=mapping,
                     meta=meta, progress=progress, workers=workers, distributed=distributed,
                     device=device)


def sweep_config(trials: int, seed: int, layers: str, finetune: Optional[TrainConfig] = None,
                 remap_every: int = CompareConfig.remap_every,
                 sam_rho: float = CompareConfig.sam_rho,
                 rbe_rate: float = CompareConfig.rbe_rate) -> CompareConfig:
    """The :class:`CompareConfig` of a sweep's arguments (no self-tuning on top)."""
    return CompareConfig(trials=trials, seed=seed, layers=layers, selftune_on_top=False,
                         finetune=finetune or default_finetune(), remap_every=remap_every,
                         sam_rho=sam_rho, rbe_rate=rbe_rate)


def _deploy_method(mapping: str) -> str:
    check_choice(mapping, ("naive", "aware"), "deploy mapping")
    return "none" if mapping == "naive" else "nearest_valid"


def evaluate_faults(model: nn.Module, test: Dataset, rates: Sequence[float], trials: int = 10,
                    seed: int = 0, mapping: str = "naive", sa1_fraction: float = 0.5,
                    layers: str = "inner", progress: bool = True, workers: int = 1,
                    distributed: bool = False, device=None) -> StudyResult:
    """Accuracy under ``trials`` random stuck-at maps per bit-fault rate (no retraining).

    ``workers`` processes on this machine and/or the ranks of a ``torch.distributed`` group
    (``distributed=True``, e.g. under torchrun) share the trials (:mod:`qfv_brevitas.util.parallel`:
    the same rows as one process); ``device`` runs on a copy of the model there (default: where
    the model is).

    ``mapping="naive"`` programs the nearest ideal level (method ``none``); ``"aware"`` the
    nearest level the faulty cells still allow (method ``nearest_valid``). ``layers="inner"``
    keeps the first and last layers (8-bit in the paper's setup) fault-free; ``"all"`` puts
    every N-multiplier layer on the faulty device."""
    method = _deploy_method(mapping)
    levels = check_levels(rates, "fault rates", 1.0)
    return run_sweep("faults", model, None, test, levels, {"sa1_fraction": sa1_fraction},
                     [method], sweep_config(trials, seed, layers),
                     {"sa1_fraction": sa1_fraction, "layers": layers}, "naive", progress,
                     workers, distributed, device)


def variability_settings(hrs_on_off: Optional[float], distribution: str, chip_sigma: float,
                         layer_shared_sigma: float, devices_per_chip: int) -> dict:
    """The variability :class:`Scenario` settings of a sweep's arguments."""
    return {"hrs_on_off": hrs_on_off, "distribution": distribution, "chip_sigma": chip_sigma,
            "layer_shared_sigma": layer_shared_sigma, "devices_per_chip": devices_per_chip}


def evaluate_variability(model: nn.Module, test: Dataset, sigmas: Sequence[float],
                         trials: int = 10, seed: int = 0, mapping: str = "naive",
                         hrs_on_off: Optional[float] = None, distribution: str = "normal",
                         layers: str = "inner", progress: bool = True, chip_sigma: float = 0.0,
                         layer_shared_sigma: float = 0.0, devices_per_chip: int = 1,
                         workers: int = 1, distributed: bool = False, device=None
                         ) -> StudyResult:
    """Accuracy under ``trials`` random variability maps per sigma/mu (no retraining):
    method ``none`` (``mapping="naive"``) or ``nearest_valid`` (``"aware"``: each weight's
    nearest level on its own perturbed level set); ``workers``, ``distributed``, ``device``
    and ``layers`` as in :func:`evaluate_faults`. ``chip_sigma`` / ``layer_shared_sigma`` add
    the between-chip / per-layer shared components of
    :class:`~qfv_brevitas.chip.variability.VariabilityModel`; consecutive groups of
    ``devices_per_chip`` trials share one chip (Monte Carlo over chips and over the devices of
    each chip)."""
    method = _deploy_method(mapping)
    levels = check_levels(sigmas, "sigmas", None)
    settings = variability_settings(hrs_on_off, distribution, chip_sigma, layer_shared_sigma,
                                    devices_per_chip)
    return run_sweep("variability", model, None, test, levels, settings, [method],
                     sweep_config(trials, seed, layers), dict(settings, layers=layers), "naive",
                     progress, workers, distributed, device)


def evaluate_bitflips(model: nn.Module, test: Dataset, rates: Sequence[float], trials: int = 10,
                      seed: int = 0, mapping: str = "naive", layers: str = "inner",
                      progress: bool = True, workers: int = 1, distributed: bool = False,
                      device=None) -> StudyResult:
    """Accuracy with random bit flips at each bit-error rate, ``trials`` seeded runs per rate
    (trial ``k`` uses seed ``seed + k``); one flip draw per evaluation batch of 512 images.
    ``mapping`` and ``layers`` as in :func:`evaluate_faults` (the mapping matters only with a
    fault or variability map attached to ``model``; the rows are method ``none``, the model as
    it is); ``workers``, ``distributed``, ``device`` as there."""
    check_choice(mapping, ("naive", "aware"), "deploy mapping")
    levels = check_levels(rates, "bit-error rates", 1.0)
    return run_sweep("bitflips", model, None, test, levels, {}, ["none"],
                     sweep_config(trials, seed, layers), {"layers": layers, "mapping": mapping},
                     mapping, progress, workers, distributed, device)
