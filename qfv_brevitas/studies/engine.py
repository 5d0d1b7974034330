"""The study engine: one Monte Carlo runner for every study of the library.

:func:`run_study` runs registered methods (:mod:`qfv_brevitas.studies.methods`) over
:class:`~qfv_brevitas.studies.scenario.Scenario` s and ``config.trials`` seeded maps per
scenario: trial ``k`` draws its map (or flip stream) from seed ``config.seed + k`` for every
method and every level (common random numbers), so methods and levels are compared on the same
chips. Methods trained once are trained from the model before any map is drawn; per-map
methods adapt a copy of the model to each map. A scenario at level 0 is the ideal device: no
map is drawn and every method deploys its model as it is. With ``config.selftune_on_top`` each
method is also reported after self-tuning (``<method>+selftune``); the reference statistics are
those of the model the method started from on the ideal device.

``workers`` processes and/or the ranks of a ``torch.distributed`` group (``distributed=True``)
share the maps (:mod:`qfv_brevitas.util.parallel`: the same rows as one process); ``device``
runs on a copy of the model there. The model passed in is never changed.

:func:`qfv_brevitas.studies.evaluate_faults` and the other entry points of
:mod:`qfv_brevitas.studies.montecarlo` and :mod:`qfv_brevitas.studies.compare` are thin calls
into :func:`run_study`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn
from torch.utils.data import Dataset

from qfv_brevitas.chip.repair import set_deploy_mapping
from qfv_brevitas.chip.selftune import calibration_batch, reference_statistics, self_tune
from qfv_brevitas.core.quantizers import nmult_layers
from qfv_brevitas.training.train import TrainConfig, evaluate, model_device
from qfv_brevitas.studies.methods import check_methods, get_method
from qfv_brevitas.studies.results import COMPARISON, IDEAL, StudyResult
from qfv_brevitas.studies.scenario import LAYER_SETS, SCENARIO_KINDS, Scenario
from qfv_brevitas.util.configbase import VERSION_KEY, QfvConfig
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.parallel import check_workers, run_tasks
from qfv_brevitas.util.progress import RunProgress
from qfv_brevitas.util.validate import (as_number, check_choice, check_fraction,
                                        check_positive_int, check_seed)

__all__ = ["CompareConfig", "default_finetune", "run_study", "check_trials", "on_device",
           "is_main_rank"]


def default_finetune() -> TrainConfig:
    """The fine-tune of every study method and of the ``qfv ... finetune`` commands unless
    given: 4 epochs at lr 0.005, lambda rising over the first 2. Four epochs, because the
    fault-aware fine-tune remaps to the nearest valid levels every ``remap_every=4`` epochs:
    with fewer the periodic remap of the paper's method never runs."""
    return TrainConfig(epochs=4, lr=0.005, lambda_rise_epochs=2)


def check_trials(trials: Any) -> int:
    """``trials`` as an int >= 1 (an integral float is accepted, a bool is not)."""
    if isinstance(trials, bool) or not float(trials).is_integer() or int(trials) < 1:
        raise QfvError(f"trials must be an integer >= 1, got {trials!r}")
    return int(trials)


def is_main_rank(distributed: bool) -> bool:
    """Whether this process reports (rank 0 of a ``torch.distributed`` group, or alone)."""
    if not distributed:
        return True
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def on_device(model: nn.Module, device) -> nn.Module:
    """A copy of ``model``, on ``device`` if given (the caller's model is left as it is)."""
    model = copy.deepcopy(model)
    return model if device is None else model.to(device)


@dataclass
class CompareConfig(QfvConfig):
    """Knobs of a study (:func:`run_study`, :func:`qfv_brevitas.studies.compare_methods`).

    Args:
        trials: maps (chips, flip streams) per scenario; trial ``k`` uses seed ``seed + k``.
        seed: first map seed; also seeds the calibration batch and the once-trained methods.
        finetune: training of every fine-tuning method (per map and once); default
            :func:`default_finetune`.
        selftune_on_top: also report each method after self-tuning.
        calib_size: unlabeled training images in the self-tuning calibration batch.
        selftune_passes: under transient bit flips, self-tuning pools each layer's statistics
            over this many calibration passes (flip draws); fixed maps need one.
        rbe_rate: bit-error rate of random-bit-error training.
        sam_rho: SAM radius of ``saq`` and ``saq_aware``.
        remap_every: nearest-valid remap period (epochs) of the fault-aware fine-tunes.
        layers: ``"inner"`` (8-bit first/last layers stay ideal) or ``"all"``.
    """

    trials: int = 10
    seed: int = 0
    finetune: TrainConfig = field(default_factory=default_finetune)
    selftune_on_top: bool = True
    calib_size: int = 64
    selftune_passes: int = 8
    rbe_rate: float = 0.02
    sam_rho: float = 0.05
    remap_every: int = 4
    layers: str = "inner"

    def validate(self) -> None:
        self.trials = check_trials(self.trials)
        self.seed = check_seed(self.seed, "CompareConfig.seed")
        if not isinstance(self.finetune, TrainConfig):
            raise QfvError(f"CompareConfig.finetune must be a TrainConfig, got "
                           f"{type(self.finetune).__name__}")
        if check_positive_int(self.calib_size, "CompareConfig.calib_size") < 2:
            raise QfvError(f"CompareConfig.calib_size must be an integer >= 2 (unlabeled "
                           f"images for self-tuning), got {self.calib_size!r}")
        self.selftune_passes = check_positive_int(self.selftune_passes,
                                                  "CompareConfig.selftune_passes")
        self.rbe_rate = check_fraction(self.rbe_rate, "CompareConfig.rbe_rate",
                                       " (the training bit-error rate, e.g. 0.02)")
        rho = as_number(self.sam_rho)
        if not (math.isfinite(rho) and rho > 0):
            raise QfvError(f"CompareConfig.sam_rho must be a finite number > 0 (the SAM "
                           f"radius, e.g. 0.05), got {self.sam_rho!r}")
        self.remap_every = check_positive_int(self.remap_every, "CompareConfig.remap_every")
        check_choice(self.layers, LAYER_SETS, "layer set")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompareConfig":
        """The configuration written by :meth:`to_dict` (its ``finetune`` as a dict)."""
        if isinstance(d, Mapping) and isinstance(d.get("finetune"), Mapping):
            ft = {k: v for k, v in d["finetune"].items() if k != VERSION_KEY}
            d = dict(d, finetune=TrainConfig(**ft))
        return super().from_dict(d)


def run_study(model: nn.Module, train: Optional[Dataset], test: Dataset,
              scenario_list: Sequence[Scenario], methods: Sequence[str],
              config: Optional[CompareConfig] = None, kind: str = COMPARISON,
              mapping: str = "naive", meta: Optional[dict] = None, progress: bool = True,
              workers: int = 1, distributed: bool = False, device=None) -> StudyResult:
    """Run ``methods`` on ``model`` over each scenario's ``config.trials`` seeded maps and
    collect test accuracies (see the module docstring).

    ``kind``: ``"compare"`` for a comparison over labelled scenarios (with the ideal-device
    rows; a method that does not apply to a scenario's kind is ``n/a`` there), or a scenario
    kind for a sweep over the levels of that kind (every scenario of that kind; a method that
    does not apply to it is refused). ``mapping``: how the starting model is deployed
    (``"naive"``: the nearest ideal level; ``"aware"``). ``meta``: extra entries of the
    result's ``meta``. ``train`` may be None when no method trains.

    Raises QfvError (a ValueError) for an unknown or inapplicable method, a bad scenario, a
    model without N-multiplier layers; TypeError for a config or scenario of the wrong type.
    """
    check_choice(kind, SCENARIO_KINDS + (COMPARISON,), "study kind")
    methods = check_methods(methods, None if kind == COMPARISON else kind)
    cfg = CompareConfig() if config is None else config
    if not isinstance(cfg, CompareConfig):
        raise TypeError(f"config must be a CompareConfig, got {type(cfg).__name__}")
    scenario_list = list(scenario_list)
    if not scenario_list:
        raise QfvError("give at least one Scenario (e.g. scenarios(stuck=[0.1]))")
    for sc in scenario_list:
        if not isinstance(sc, Scenario):
            raise TypeError(f"scenarios must be Scenario objects, got {type(sc).__name__}")
        if kind != COMPARISON and sc.kind != kind:
            raise QfvError(f"a {kind} study takes {kind} scenarios, got {sc.kind!r}")
    check_choice(mapping, ("naive", "aware"), "deploy mapping")
    if not nmult_layers(model):
        raise QfvError("the model has no N-multiplier layer to put on a chip")
    workers = check_workers(workers)

    plain = [m for m in methods if not get_method(m).selftune]
    tuned: Dict[str, str] = {m: f"{m}+selftune" for m in plain} if cfg.selftune_on_top else {}
    for m in methods:
        if get_method(m).selftune:
            tuned["none"] = m
    runs = plain + (["none"] if "none" in tuned and "none" not in plain else [])
    needs = [m for m in methods if get_method(m).needs_train] + (["self-tuning"] if tuned
                                                                 else [])
    if train is None and needs:
        raise QfvError(f"give a training set: {', '.join(needs)} learn(s) from it")

    base = on_device(model, device).eval()
    set_deploy_mapping(base, mapping)
    comparison = kind == COMPARISON
    trials = cfg.trials
    bar = RunProgress(len(scenario_list) * trials,
                      "compare" if comparison else f"Monte Carlo ({kind})", unit="map",
                      enabled=progress and is_main_rank(distributed))
    starts: Dict[str, nn.Module] = {"base": base}
    for m in runs:
        if not get_method(m).per_map:
            bar.set_phase(f"training {m}")
            starts[m] = copy.deepcopy(base)
            get_method(m).fn(starts[m], train, cfg)
            starts[m].eval()
    bar.set_phase("maps")
    calib = refs = None
    if tuned:
        calib = calibration_batch(train, cfg.calib_size, cfg.seed).to(model_device(base))
        refs = {k: reference_statistics(v, calib) for k, v in starts.items()}

    ideal: Dict[str, float] = {}

    def ideal_acc(start: str) -> float:
        if start not in ideal:
            ideal[start] = evaluate(starts[start], test)
        return ideal[start]

    def start_of(method: str) -> str:
        return "base" if get_method(method).per_map else method

    if comparison:
        result = StudyResult(COMPARISON, meta=dict(
            meta or {}, methods=methods,
            scenarios=[dict(s.to_dict(), label=s.label) for s in scenario_list],
            config=cfg.to_dict(), ideal_label=IDEAL))
        for m in plain:
            result.rows.append(_row(True, None, m, 0, cfg.seed, ideal_acc(start_of(m))))
    else:
        result = StudyResult(kind, meta=dict(meta or {}, levels=[s.level for s in scenario_list],
                                             trials=trials, seed=cfg.seed, methods=methods))
    tasks = [(sc, k) for sc in scenario_list for k in range(trials)]

    def task(i: int) -> List[tuple]:
        """(method, accuracy) of every method on the map of task ``i``."""
        sc, k = tasks[i]
        out = []
        for method in runs:
            if not get_method(method).applies(sc.kind):
                continue
            start = start_of(method)
            if sc.is_ideal:  # no map to adapt to: every method deploys its model as it is
                acc = ideal_acc(start)
                if method in plain:
                    out.append((method, acc))
                if method in tuned:
                    out.append((tuned[method], acc))
                continue
            m = copy.deepcopy(starts[start])
            sc.attach(m, cfg.seed, k, cfg.layers)
            if get_method(method).per_map:
                get_method(method).fn(m, sc, train, cfg)
            acc = evaluate(m, test)
            if method in plain:
                out.append((method, acc))
            if method in tuned:
                self_tune(m, calib, refs[start],
                          passes=cfg.selftune_passes if sc.kind == "bitflips" else 1)
                if sc.kind == "bitflips":
                    # Restart the flip stream: the evaluation reads the same flips as the
                    # row without self-tuning (the calibration pass drew its own).
                    sc.attach(m, cfg.seed, k, cfg.layers)
                out.append((tuned[method], evaluate(m, test)))
        return out

    try:
        per_map = run_tasks(len(tasks), task, workers, distributed, bar)
    finally:
        bar.close()
    for (sc, k), accs in zip(tasks, per_map):
        for method, acc in accs:
            result.rows.append(_row(comparison, sc, method, k, cfg.seed, acc))
    return result


def _row(comparison: bool, sc: Optional[Scenario], method: str, trial: int, seed: int,
         acc: float) -> dict:
    if not comparison:
        return {"method": method, "level": sc.level, "trial": trial, "seed": seed + trial,
                "acc": acc}
    return {"scenario": IDEAL if sc is None else sc.label,
            "kind": "ideal" if sc is None else sc.kind, "level": 0.0 if sc is None else sc.level,
            "chip_sigma": 0.0 if sc is None else sc.chip_sigma, "method": method,
            "trial": trial, "seed": seed + trial, "acc": acc}
