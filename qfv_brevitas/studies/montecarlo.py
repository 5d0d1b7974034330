"""Monte Carlo evaluation under faults and variability, and method comparisons.

Every trial draws its own seeded map (trial ``k`` uses ``seed + k`` at every level, so that the
methods and the levels are compared on the same maps: common random numbers). Results are
rows ``(method, level, trial, seed, acc)`` with summaries (mean, std, min), CSV/JSON and a plot
of accuracy against the fault rate or sigma/mu, one line per method, error bars = std.
"""
from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from qfv_brevitas.util.validate import check_choice
from qfv_brevitas.core.convert import set_forward_mode
from qfv_brevitas.util.parallel import check_workers, run_tasks
from qfv_brevitas.util.progress import RunProgress
from qfv_brevitas.core.quantizers import nmult_layers
from qfv_brevitas.chip.repair import (chip_in_loop_finetune, fault_aware_finetune, set_deploy_mapping,
                     variability_aware_finetune)
from qfv_brevitas.util.safeio import atomic_paths
from qfv_brevitas.core.train import TrainConfig, evaluate

__all__ = ["LAYER_SETS", "edge_layers", "MonteCarloResult", "evaluate_faults", "evaluate_variability", "compare_faults",
           "compare_variability", "FAULT_METHODS", "VARIABILITY_METHODS"]

FAULT_METHODS = ("none", "nearest_valid", "fault_aware", "chip_in_loop")
VARIABILITY_METHODS = ("none", "chip_in_loop", "variability_aware")


def accuracy_stats(accs: List[float]) -> dict:
    """Mean, sample std, min, max and count of accuracies over Monte Carlo trials.

    >>> accuracy_stats([1.0, 3.0])
    {'mean': 2.0, 'std': 1.4142135623730951, 'min': 1.0, 'max': 3.0, 'trials': 2}
    """
    n = len(accs)
    mean = sum(accs) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(accs), "max": max(accs), "trials": n}


@dataclass
class MonteCarloResult:
    """Accuracies of methods over levels (fault rates or sigma/mu) and random maps."""

    kind: str  # "faults" or "variability"
    rows: List[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def level_name(self) -> str:
        return {"faults": "bit-fault rate", "bitflips": "bit-error rate"}.get(self.kind,
                                                                           "sigma/mu")

    def summary(self) -> List[dict]:
        """Per (method, level): mean, std (sample), min, max of accuracy over the trials."""
        groups: Dict[tuple, List[float]] = {}
        for r in self.rows:
            groups.setdefault((r["method"], r["level"]), []).append(r["acc"])
        return [dict(method=method, level=level, **accuracy_stats(accs))
                for (method, level), accs in groups.items()]

    def table(self) -> str:
        """Methods as columns, levels as rows: ``mean +- std (min)`` in percent."""
        summ = self.summary()
        methods = list(dict.fromkeys(s["method"] for s in summ))
        levels = sorted({s["level"] for s in summ})
        by = {(s["method"], s["level"]): s for s in summ}
        head = f"{self.level_name:>14} | " + " | ".join(f"{m:^24}" for m in methods)
        lines = [head, "-" * len(head)]
        for lv in levels:
            cells = []
            for m in methods:
                s = by.get((m, lv))
                cells.append(f"{'':^24}" if s is None else
                             f"{100 * s['mean']:6.2f} +- {100 * s['std']:5.2f} ({100 * s['min']:6.2f})")
            lines.append(f"{lv:>14g} | " + " | ".join(cells))
        return "\n".join(lines)

    def save(self, out_dir: Union[str, Path], name: str, overwrite: bool = False
             ) -> Dict[str, Path]:
        """Write ``name.csv`` (every trial), ``name.json`` (rows, summary, meta) and
        ``name.png`` (accuracy against level, one line per method, std error bars), together
        and atomically (:mod:`qfv_brevitas.util.safeio`): existing files only with ``overwrite``."""
        out = Path(out_dir)
        paths = {"csv": out / f"{name}.csv", "json": out / f"{name}.json",
                 "png": out / f"{name}.png"}
        with atomic_paths(list(paths.values()), overwrite=overwrite) as tmps:
            tmp = dict(zip(paths, tmps))
            with open(tmp["csv"], "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["method", "level", "trial", "seed", "acc"])
                w.writeheader()
                for r in self.rows:
                    w.writerow({k: r[k] for k in w.fieldnames})
            tmp["json"].write_text(json.dumps({"kind": self.kind, "level_name": self.level_name,
                                               "meta": self.meta, "summary": self.summary(),
                                               "rows": self.rows}, indent=2))
            self.plot(tmp["png"], overwrite=True, format="png")
        return paths

    def plot(self, path: Union[str, Path], overwrite: bool = False,
             format: Optional[str] = None) -> Path:
        """Accuracy against level, one line per method (std error bars), written to ``path``
        (atomically; an existing file only with ``overwrite``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        summ = self.summary()
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in dict.fromkeys(s["method"] for s in summ):
            pts = sorted((s["level"], s["mean"], s["std"]) for s in summ if s["method"] == m)
            xs = [100 * p[0] for p in pts]
            ax.errorbar(xs, [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                        marker="o", capsize=3, label=m)
        ax.set_xlabel(f"{self.level_name} (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        from qfv_brevitas.studies.plots import save_figure

        return save_figure(fig, path, ax, self.meta.get("title", ""), title_size=10,
                           overwrite=overwrite, format=format)


def _check_levels(levels: Sequence[float], what: str, upper: Optional[float]) -> List[float]:
    levels = [float(v) for v in levels]
    if not levels:
        raise ValueError(f"give at least one {what}")
    for v in levels:
        if not math.isfinite(v) or v < 0 or (upper is not None and v > upper):
            rng = f"[0, {upper}]" if upper is not None else ">= 0"
            raise ValueError(f"{what} must be in {rng}, got {v}")
    return levels


def _check_trials(trials: int) -> int:
    if isinstance(trials, bool) or not float(trials).is_integer() or int(trials) < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    return int(trials)


LAYER_SETS = ("inner", "all")


def edge_layers(model: nn.Module) -> List[str]:
    """First and last N-multiplier layers (registration order): the 8-bit edges of a model
    made by :func:`qfv_brevitas.quantize_model`."""
    names = [n for n, _ in nmult_layers(model)]
    return list(dict.fromkeys([names[0], names[-1]])) if len(names) > 1 else []


def _exempt(model: nn.Module, layers: str) -> Dict[str, float]:
    check_choice(layers, LAYER_SETS, "layer set")
    return {n: 0.0 for n in edge_layers(model)} if layers == "inner" else {}


def _fault_sampler(sa1_fraction: float, layers: str):
    from qfv_brevitas.chip.faults import FaultModel, attach_faults, sample_fault_map

    def attach(model: nn.Module, level: float, seed: int) -> None:
        attach_faults(model, sample_fault_map(model, FaultModel(
            rate=level, sa1_fraction=sa1_fraction, seed=seed,
            layer_rates=_exempt(model, layers))))
    return attach


def _variability_sampler(hrs_on_off: Optional[float], distribution: str, layers: str,
                         chip_sigma: float = 0.0, layer_shared_sigma: float = 0.0,
                         devices_per_chip: int = 1, base_seed: int = 0):
    from qfv_brevitas.chip.variability import VariabilityModel, attach_variability, sample_variability_map

    if isinstance(devices_per_chip, bool) or int(devices_per_chip) != devices_per_chip \
            or devices_per_chip < 1:
        raise ValueError(f"devices_per_chip must be an integer >= 1, got {devices_per_chip!r}")

    def attach(model: nn.Module, level: float, seed: int) -> None:
        # Trials come in groups of devices_per_chip maps drawn on the same chip (the shared
        # components' seed), each with its own device-to-device draw.
        chip = base_seed + (seed - base_seed) // int(devices_per_chip)
        attach_variability(model, sample_variability_map(model, VariabilityModel(
            sigma=level, hrs_on_off=hrs_on_off, distribution=distribution, seed=seed,
            layer_sigmas=_exempt(model, layers), chip_sigma=chip_sigma,
            layer_shared_sigma=layer_shared_sigma, chip_seed=chip)))
    return attach


def _is_main_rank(distributed: bool) -> bool:
    if not distributed:
        return True
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _on_device(model: nn.Module, device) -> nn.Module:
    """``model`` itself, or a copy on ``device`` (the caller's model is left where it is)."""
    if device is None:
        return model
    return copy.deepcopy(model).to(torch.device(device))


def _run(kind: str, model: nn.Module, train: Optional[Dataset], test: Dataset,
         levels: List[float], trials: int, seed: int, methods: Sequence[str],
         attach: Callable, apply: Dict[str, Callable], progress: bool, meta: dict,
         workers: int = 1, distributed: bool = False, device=None) -> MonteCarloResult:
    if not nmult_layers(model):
        raise ValueError("the model has no N-multiplier layer to put on a device")
    check_choice(meta.get("layers", "inner"), LAYER_SETS, "layer set")
    workers = check_workers(workers)
    model = _on_device(model, device)
    result = MonteCarloResult(kind, meta=dict(meta, levels=levels, trials=trials, seed=seed,
                                              methods=list(methods)))
    tasks = [(level, k, method) for level in levels for k in range(trials) for method in methods]
    clean: List[float] = []

    def task(i: int) -> float:
        level, k, method = tasks[i]
        if level == 0:
            # No map to adapt to: every method deploys the model as it is.
            if not clean:
                clean.append(evaluate(model, test))
            return clean[0]
        m = copy.deepcopy(model)
        attach(m, level, seed + k)
        apply[method](m, train)
        return evaluate(m, test)

    bar = RunProgress(len(tasks), f"Monte Carlo ({kind})", unit="trial",
                      enabled=progress and _is_main_rank(distributed))
    try:
        accs = run_tasks(len(tasks), task, workers, distributed, bar)
    finally:
        bar.close()
    for (level, k, method), acc in zip(tasks, accs):
        result.rows.append({"method": method, "level": level, "trial": k,
                            "seed": seed + k, "acc": acc})
    return result


def _deploy(mapping: str):
    def apply(m: nn.Module, train) -> None:
        set_deploy_mapping(m, mapping)
    return apply


def evaluate_faults(model: nn.Module, test: Dataset, rates: Sequence[float], trials: int = 10,
                    seed: int = 0, mapping: str = "naive", sa1_fraction: float = 0.5,
                    layers: str = "inner", progress: bool = True, workers: int = 1,
                    distributed: bool = False, device=None) -> MonteCarloResult:
    """Accuracy under ``trials`` random stuck-at maps per bit-fault rate (no retraining).

    ``workers`` processes on this machine and/or the ranks of a ``torch.distributed`` group
    (``distributed=True``, e.g. under torchrun) share the trials (:mod:`qfv_brevitas.util.parallel`:
    the same rows as one process); ``device`` runs on a copy of the model there (default: where
    the model is).

    ``mapping="naive"`` programs the nearest ideal level (method ``none``); ``"aware"`` the
    nearest level the faulty cells still allow (method ``nearest_valid``). ``layers="inner"``
    keeps the first and last layers (8-bit in the paper's setup) fault-free; ``"all"`` puts
    every N-multiplier layer on the faulty device."""
    check_choice(mapping, ("naive", "aware"), "deploy mapping")
    method = "none" if mapping == "naive" else "nearest_valid"
    return _run("faults", model, None, test, _check_levels(rates, "fault rates", 1.0),
                _check_trials(trials), seed, [method], _fault_sampler(sa1_fraction, layers),
                {method: _deploy(mapping)}, progress,
                {"sa1_fraction": sa1_fraction, "layers": layers}, workers, distributed, device)


def evaluate_variability(model: nn.Module, test: Dataset, sigmas: Sequence[float],
                         trials: int = 10, seed: int = 0, mapping: str = "naive",
                         hrs_on_off: Optional[float] = None, distribution: str = "normal",
                         layers: str = "inner", progress: bool = True, chip_sigma: float = 0.0,
                         layer_shared_sigma: float = 0.0, devices_per_chip: int = 1,
                         workers: int = 1, distributed: bool = False, device=None
                         ) -> MonteCarloResult:
    """Accuracy under ``trials`` random variability maps per sigma/mu (no retraining);
    ``workers``, ``distributed``, ``device`` as in :func:`evaluate_faults`;
    ``layers`` as in :func:`evaluate_faults`. ``chip_sigma`` / ``layer_shared_sigma`` add the
    between-chip / per-layer shared components of :class:`VariabilityModel`; consecutive
    groups of ``devices_per_chip`` trials share one chip (Monte Carlo over chips and over the
    devices of each chip)."""
    check_choice(mapping, ("naive", "aware"), "deploy mapping")
    method = "none" if mapping == "naive" else "aware_mapping"
    return _run("variability", model, None, test, _check_levels(sigmas, "sigmas", None),
                _check_trials(trials), seed, [method],
                _variability_sampler(hrs_on_off, distribution, layers, chip_sigma,
                                     layer_shared_sigma, devices_per_chip, seed),
                {method: _deploy(mapping)}, progress,
                {"hrs_on_off": hrs_on_off, "distribution": distribution, "layers": layers,
                 "chip_sigma": chip_sigma, "layer_shared_sigma": layer_shared_sigma,
                 "devices_per_chip": devices_per_chip}, workers, distributed, device)


def _finetune_methods(finetune: TrainConfig, remap_every: int) -> Dict[str, Callable]:
    def fa(m, train):
        fault_aware_finetune(m, train, None, finetune, remap_every=remap_every, progress=False)

    def va(m, train):
        variability_aware_finetune(m, train, None, finetune, progress=False)

    def cil(m, train):
        chip_in_loop_finetune(m, train, None, finetune, progress=False)
        set_forward_mode(m, "paper")  # eval is the same in every mode; keep the model plain

    return {"none": _deploy("naive"), "nearest_valid": _deploy("aware"), "fault_aware": fa,
            "variability_aware": va, "chip_in_loop": cil}


def _default_finetune() -> TrainConfig:
    return TrainConfig(epochs=4, lr=0.005, lambda_rise_epochs=2)


def compare_faults(model: nn.Module, train: Dataset, test: Dataset, rates: Sequence[float],
                   trials: int = 10, methods: Sequence[str] = ("none", "nearest_valid",
                                                               "fault_aware"),
                   finetune: Optional[TrainConfig] = None, remap_every: int = 4, seed: int = 0,
                   sa1_fraction: float = 0.5, layers: str = "inner", progress: bool = True,
                   workers: int = 1, distributed: bool = False, device=None
                   ) -> MonteCarloResult:
    """Each method on the same maps: ``none`` (naive deployment), ``nearest_valid`` (FAQ/Matic
    nearest-valid-level mapping), ``fault_aware`` (eq. 11 fine-tune + remap, per map) and
    ``chip_in_loop`` (STE fine-tune through the faulty weights, per map); ``workers``,
    ``distributed``, ``device`` as in :func:`evaluate_faults`."""
    for m in methods:
        check_choice(m, FAULT_METHODS, "fault method")
    finetune = finetune or _default_finetune()
    return _run("faults", model, train, test, _check_levels(rates, "fault rates", 1.0),
                _check_trials(trials), seed, list(methods), _fault_sampler(sa1_fraction, layers),
                _finetune_methods(finetune, remap_every), progress,
                {"sa1_fraction": sa1_fraction, "finetune_epochs": finetune.epochs,
                 "remap_every": remap_every, "layers": layers}, workers, distributed, device)


def compare_variability(model: nn.Module, train: Dataset, test: Dataset,
                        sigmas: Sequence[float], trials: int = 10,
                        methods: Sequence[str] = VARIABILITY_METHODS,
                        finetune: Optional[TrainConfig] = None, seed: int = 0,
                        hrs_on_off: Optional[float] = None, distribution: str = "normal",
                        layers: str = "inner", progress: bool = True, chip_sigma: float = 0.0,
                        layer_shared_sigma: float = 0.0, devices_per_chip: int = 1,
                        workers: int = 1, distributed: bool = False, device=None
                        ) -> MonteCarloResult:
    """Each method on the same variability maps: ``none``, ``chip_in_loop`` and
    ``variability_aware`` (eq. 12 fine-tune, deployed with aware mapping); shared components
    as in :func:`evaluate_variability`; ``workers``, ``distributed``, ``device`` as in
    :func:`evaluate_faults`."""
    for m in methods:
        check_choice(m, VARIABILITY_METHODS, "variability method")
    finetune = finetune or _default_finetune()
    return _run("variability", model, train, test, _check_levels(sigmas, "sigmas", None),
                _check_trials(trials), seed, list(methods),
                _variability_sampler(hrs_on_off, distribution, layers, chip_sigma,
                                     layer_shared_sigma, devices_per_chip, seed),
                _finetune_methods(finetune, 4), progress,
                {"hrs_on_off": hrs_on_off, "distribution": distribution,
                 "finetune_epochs": finetune.epochs, "layers": layers,
                 "chip_sigma": chip_sigma, "layer_shared_sigma": layer_shared_sigma,
                 "devices_per_chip": devices_per_chip}, workers, distributed, device)
