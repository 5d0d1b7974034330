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
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.utils.data import Dataset

from qfv_brevitas.chip.repair import set_deploy_mapping
from qfv_brevitas.chip.selftune import calibration_batch, reference_statistics, self_tune
from qfv_brevitas.core.quantizers import nmult_layers
from qfv_brevitas.training.sam import check_rho
from qfv_brevitas.training.train import TrainConfig, evaluate, model_device
from qfv_brevitas.studies.methods import Method, check_methods, get_method
from qfv_brevitas.studies.results import COMPARISON, IDEAL, StudyResult
from qfv_brevitas.studies.scenario import LAYER_SETS, SCENARIO_KINDS, Scenario
from qfv_brevitas.util.configbase import VERSION_KEY, QfvConfig
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.parallel import check_workers, run_tasks
from qfv_brevitas.util.progress import RunProgress
from qfv_brevitas.util.validate import (check_choice, check_count, check_fraction,
                                        check_positive_int, check_seed)

__all__ = ["CompareConfig", "default_finetune", "run_study", "check_trials", "on_device",
           "is_main_rank", "StudyPlan", "plan_study", "TrialStarts", "prepare_starts",
           "run_trial", "run_map"]


def default_finetune() -> TrainConfig:
    """The fine-tune of every study method and of the ``qfv ... finetune`` commands unless
    given: 4 epochs at lr 0.005, lambda rising over the first 2. Four epochs, because the
    fault-aware fine-tune remaps to the nearest valid levels every ``remap_every=4`` epochs:
    with fewer the periodic remap of the paper's method never runs."""
    return TrainConfig(epochs=4, lr=0.005, lambda_rise_epochs=2)


def check_trials(trials: Any) -> int:
    """``trials`` as an int >= 1 (an integral float is accepted; a bool or a string is not)."""
    return check_count(trials, "trials")


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
        check_rho(self.sam_rho, "CompareConfig.sam_rho")
        self.remap_every = check_positive_int(self.remap_every, "CompareConfig.remap_every")
        check_choice(self.layers, LAYER_SETS, "layer set")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompareConfig":
        """The configuration written by :meth:`to_dict` (its ``finetune`` as a dict)."""
        if isinstance(d, Mapping) and isinstance(d.get("finetune"), Mapping):
            ft = {k: v for k, v in d["finetune"].items() if k != VERSION_KEY}
            d = dict(d, finetune=TrainConfig(**ft))
        return super().from_dict(d)


def check_scenarios(scenario_list: Sequence[Scenario], kind: str) -> Tuple[Scenario, ...]:
    """``scenario_list`` as a tuple: at least one, each a :class:`Scenario`, each of ``kind``
    unless the study is a comparison."""
    scenario_list = tuple(scenario_list)
    if not scenario_list:
        raise QfvError("give at least one Scenario (e.g. scenarios(stuck=[0.1]))")
    for sc in scenario_list:
        if not isinstance(sc, Scenario):
            raise TypeError(f"scenarios must be Scenario objects, got {type(sc).__name__}")
        if kind != COMPARISON and sc.kind != kind:
            raise QfvError(f"a {kind} study takes {kind} scenarios, got {sc.kind!r}")
    return scenario_list


@dataclass(frozen=True)
class StudyPlan:
    """What a study runs, resolved once from :func:`run_study`'s arguments by
    :func:`plan_study`; the trials only read it.

    Self-tuning is not a model of its own: it is applied on top of a deployed model. So
    ``runs`` (the models deployed on each map) are the methods reported as they are
    (``plain``), plus ``none`` when only its self-tuned rows are asked for (method
    ``selftune``); ``tuned`` names the rows of a run after self-tuning
    (``<method>+selftune`` with ``config.selftune_on_top``; ``none`` -> ``selftune`` when
    that method is asked for). ``once`` are the runs trained once, before any map; every
    other run starts from the base model. ``tasks`` are the maps, ``(scenario, trial)`` in
    row order.
    """

    kind: str
    methods: Tuple[str, ...]
    scenarios: Tuple[Scenario, ...]
    config: CompareConfig
    mapping: str
    workers: int
    plain: Tuple[str, ...]
    tuned: Mapping[str, str]
    runs: Tuple[Method, ...]
    once: Tuple[str, ...]
    tasks: Tuple[Tuple[Scenario, int], ...]

    @property
    def comparison(self) -> bool:
        """A comparison over labelled scenarios (rather than a sweep over one kind's levels)."""
        return self.kind == COMPARISON

    def start_of(self, method: str) -> str:
        """The model ``method`` starts from on each map: its own once-trained one, or base."""
        return method if method in self.once else "base"

    def rows_of(self, method: str, acc: float, tuned_acc: Optional[float]
                ) -> List[Tuple[str, float]]:
        """``(row method, accuracy)`` of run ``method``: as it is, and after self-tuning."""
        out = [(method, acc)] if method in self.plain else []
        if method in self.tuned:
            out.append((self.tuned[method], tuned_acc))
        return out


def plan_study(model: nn.Module, train: Optional[Dataset], scenario_list: Sequence[Scenario],
               methods: Sequence[str], config: Optional[CompareConfig], kind: str,
               mapping: str, workers: int) -> StudyPlan:
    """The :class:`StudyPlan` of :func:`run_study`'s arguments, after checking all of them
    (the errors :func:`run_study` lists), before any model is copied or trained."""
    check_choice(kind, SCENARIO_KINDS + (COMPARISON,), "study kind")
    methods = check_methods(methods, None if kind == COMPARISON else kind)
    cfg = CompareConfig() if config is None else config
    if not isinstance(cfg, CompareConfig):
        raise TypeError(f"config must be a CompareConfig, got {type(cfg).__name__}")
    scenario_list = check_scenarios(scenario_list, kind)
    check_choice(mapping, ("naive", "aware"), "deploy mapping")
    if not nmult_layers(model):
        raise QfvError("the model has no N-multiplier layer to put on a chip")
    workers = check_workers(workers)

    plain = tuple(m for m in methods if not get_method(m).selftune)
    tuned: Dict[str, str] = {m: f"{m}+selftune" for m in plain} if cfg.selftune_on_top else {}
    for m in methods:
        if get_method(m).selftune:
            tuned["none"] = m
    runs = plain + (("none",) if "none" in tuned and "none" not in plain else ())
    needs = [m for m in methods if get_method(m).needs_train] + (["self-tuning"] if tuned
                                                                 else [])
    if train is None and needs:
        raise QfvError(f"give a training set: {', '.join(needs)} learn(s) from it")
    return StudyPlan(
        kind=kind, methods=tuple(methods), scenarios=scenario_list, config=cfg,
        mapping=mapping, workers=workers, plain=plain, tuned=tuned,
        runs=tuple(get_method(m) for m in runs),
        once=tuple(m for m in runs if not get_method(m).per_map),
        tasks=tuple((sc, k) for sc in scenario_list for k in range(cfg.trials)))


@dataclass
class TrialStarts:
    """The models every trial copies, built once before the maps (:func:`prepare_starts`):
    ``models["base"]`` (the model deployed with the study's mapping) and each once-trained
    run's model; with self-tuning, the calibration batch and each model's reference
    statistics. ``ideal`` caches each model's accuracy on the ideal device (it has no map,
    so every trial of an ideal scenario (level 0, no HRS leak) and every ideal-device row reads
    the same number)."""

    models: Dict[str, nn.Module]
    calib: Optional[Tensor] = None
    refs: Optional[Dict[str, Any]] = None
    ideal: Dict[str, float] = field(default_factory=dict)

    def ideal_accuracy(self, start: str, test: Dataset) -> float:
        """The test accuracy of model ``start`` on the ideal device (measured once)."""
        if start not in self.ideal:
            self.ideal[start] = evaluate(self.models[start], test)
        return self.ideal[start]


def prepare_starts(plan: StudyPlan, model: nn.Module, train: Optional[Dataset], device,
                   bar: RunProgress) -> TrialStarts:
    """The :class:`TrialStarts` of ``plan``: a copy of ``model`` (on ``device``) deployed with
    the plan's mapping, each once-trained run trained from it, and, when a run self-tunes,
    the calibration batch and the reference statistics of every start."""
    cfg = plan.config
    base = on_device(model, device).eval()
    set_deploy_mapping(base, plan.mapping)
    models: Dict[str, nn.Module] = {"base": base}
    for m in plan.once:
        bar.set_phase(f"training {m}")
        models[m] = copy.deepcopy(base)
        get_method(m).fn(models[m], train, cfg)
        models[m].eval()
    bar.set_phase("maps")
    starts = TrialStarts(models)
    if plan.tuned:
        starts.calib = calibration_batch(train, cfg.calib_size, cfg.seed).to(model_device(base))
        starts.refs = {k: reference_statistics(v, starts.calib) for k, v in models.items()}
    return starts


def run_trial(plan: StudyPlan, starts: TrialStarts, method: Method, sc: Scenario, trial: int,
              train: Optional[Dataset], test: Dataset) -> List[Tuple[str, float]]:
    """One trial: run ``method`` of ``plan`` on map ``trial`` of ``sc`` (drawn from seed
    ``config.seed + trial``), on a copy of its start; its ``(row method, accuracy)`` pairs
    (:meth:`StudyPlan.rows_of`)."""
    cfg = plan.config
    start = plan.start_of(method.name)
    if sc.is_ideal:  # no map to adapt to: every method deploys its model as it is
        acc = starts.ideal_accuracy(start, test)
        return plan.rows_of(method.name, acc, acc)
    m = copy.deepcopy(starts.models[start])
    sc.attach(m, cfg.seed, trial, cfg.layers)
    if method.per_map:
        method.fn(m, sc, train, cfg)
    acc = evaluate(m, test)
    if method.name not in plan.tuned:
        return plan.rows_of(method.name, acc, None)
    self_tune(m, starts.calib, starts.refs[start],
              passes=cfg.selftune_passes if sc.kind == "bitflips" else 1)
    if sc.kind == "bitflips":
        # Restart the flip stream: the evaluation reads the same flips as the row without
        # self-tuning (the calibration pass drew its own).
        sc.attach(m, cfg.seed, trial, cfg.layers)
    return plan.rows_of(method.name, acc, evaluate(m, test))


def run_map(plan: StudyPlan, starts: TrialStarts, train: Optional[Dataset], test: Dataset,
            task: int) -> List[Tuple[str, float]]:
    """The trials of every run that applies on map ``plan.tasks[task]``: the unit of work
    :func:`qfv_brevitas.util.parallel.run_tasks` spreads (plain data back)."""
    sc, trial = plan.tasks[task]
    out: List[Tuple[str, float]] = []
    for method in plan.runs:
        if method.applies(sc.kind):
            out.extend(run_trial(plan, starts, method, sc, trial, train, test))
    return out


def new_result(plan: StudyPlan, starts: TrialStarts, test: Dataset,
               meta: Optional[dict]) -> StudyResult:
    """The empty :class:`StudyResult` of ``plan`` with its ``meta``; a comparison starts with
    each plain method's row on the ideal device."""
    cfg = plan.config
    if not plan.comparison:
        return StudyResult(plan.kind, meta=dict(
            meta or {}, levels=[s.level for s in plan.scenarios], trials=cfg.trials,
            seed=cfg.seed, methods=list(plan.methods)))
    result = StudyResult(COMPARISON, meta=dict(
        meta or {}, methods=list(plan.methods),
        scenarios=[dict(s.to_dict(), label=s.label) for s in plan.scenarios],
        config=cfg.to_dict(), ideal_label=IDEAL))
    for m in plan.plain:
        acc = starts.ideal_accuracy(plan.start_of(m), test)
        result.rows.append(_row(True, None, m, 0, cfg.seed, acc))
    return result


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
    plan = plan_study(model, train, scenario_list, methods, config, kind, mapping, workers)
    bar = RunProgress(len(plan.tasks),
                      "compare" if plan.comparison else f"Monte Carlo ({kind})", unit="map",
                      enabled=progress and is_main_rank(distributed))
    starts = prepare_starts(plan, model, train, device, bar)
    result = new_result(plan, starts, test, meta)
    try:
        per_map = run_tasks(len(plan.tasks), partial(run_map, plan, starts, train, test),
                            plan.workers, distributed, bar)
    finally:
        bar.close()
    for (sc, trial), accs in zip(plan.tasks, per_map):
        for method, acc in accs:
            result.rows.append(_row(plan.comparison, sc, method, trial, plan.config.seed, acc))
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
