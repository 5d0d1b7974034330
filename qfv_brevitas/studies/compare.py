"""The seed papers' methods side by side on the same model, data and maps.

:func:`compare_methods` runs a chosen set of methods over a list of :class:`Scenario` s (stuck-at
faults, transient bit flips, per-cell variability with or without a between-chip component) and
``trials`` seeded maps per scenario: trial ``k`` draws its map (or flip stream) from seed
``seed + k`` for every method, so the methods are compared on the same chips. It returns a
:class:`MethodComparison`: one table (mean, std, min over the maps) and one plot.

Methods (:data:`METHODS`; "per map": fine-tuned on each chip's map, "once": trained once
before any map is drawn):

- ``none``: the model as it is, naive mapping (nearest ideal level);
- ``nearest_valid``: aware mapping, the nearest level the chip can hold (the paper's baseline);
- ``paper`` (per map): the paper's device-aware regularizer, squared distance (eq. 11 plus the
  periodic remap for faults, eq. 12 for variability);
- ``gauss``, ``sin`` (per map): the same with the Gaussian-well / SinReQ shape;
- ``chip_in_loop`` (per map): simulated chip-in-loop, STE through the chip's weights (baseline);
- ``saq_aware`` (per map): ``paper`` with FlatENN's sharpness-aware (SAM) updates;
- ``random_bit_error`` (once): random-bit-error training at ``rbe_rate``;
- ``saq`` (once): FlatENN's SAQ, a QAT fine-tune with SAM updates;
- ``selftune``: ``none`` plus self-tuning on the chip (no labels, no weight update).

Per-map methods need the chip's map, so they do not apply to transient bit flips (table cell
``n/a``). Methods trained once are trained from the model before any map is drawn and deployed
naively, like ``none``. With ``selftune_on_top`` every method is also reported after self-tuning
(``<method>+selftune``); the reference statistics are those of the model the method started from
on the ideal device (the given model, or the once-trained model). All fine-tunes use
``CompareConfig.finetune``.
"""
from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from torch import nn
from torch.utils.data import Dataset

from qfv_brevitas.studies import montecarlo as E
from qfv_brevitas.util.validate import check_fraction, check_seed
from qfv_brevitas.chip.bitflips import BitFlipModel, _flip_sampler, random_bit_error_finetune
from qfv_brevitas.util.validate import check_choice
from qfv_brevitas.core.convert import set_forward_mode
from qfv_brevitas.util.parallel import check_workers, run_tasks
from qfv_brevitas.util.progress import RunProgress
from qfv_brevitas.core.quantizers import nmult_layers
from qfv_brevitas.chip.repair import (chip_in_loop_finetune, fault_aware_finetune, set_deploy_mapping,
                     variability_aware_finetune)
from qfv_brevitas.util.safeio import atomic_paths
from qfv_brevitas.chip.selftune import calibration_batch, reference_statistics, self_tune
from qfv_brevitas.core.train import TrainConfig, evaluate, fit, model_device

__all__ = ["SCENARIO_KINDS", "METHODS", "APPLIES", "Scenario", "scenarios", "CompareConfig",
           "MethodComparison", "compare_methods"]

SCENARIO_KINDS = ("faults", "bitflips", "variability")
METHODS = ("none", "nearest_valid", "paper", "gauss", "sin", "chip_in_loop", "saq_aware",
           "random_bit_error", "saq", "selftune")
_PER_MAP = ("nearest_valid", "paper", "gauss", "sin", "chip_in_loop", "saq_aware")
_ONCE = ("random_bit_error", "saq")
#: Methods that apply to each scenario kind (per-map methods need a map: no transient flips).
APPLIES = {"faults": set(METHODS), "variability": set(METHODS),
           "bitflips": set(METHODS) - set(_PER_MAP)}
IDEAL = "ideal device"


@dataclass
class Scenario:
    """One kind of imperfect chip: ``kind`` in :data:`SCENARIO_KINDS` at ``level`` (stuck-cell
    fraction, bit-error rate, or LRS sigma/mu); variability may add shared components
    (``chip_sigma``, ``layer_shared_sigma`` of :class:`qfv_brevitas.VariabilityModel`).

    >>> Scenario("variability", 0.2, chip_sigma=0.1).label
    'LRS 20% + chip 10%'
    >>> Scenario("bitflip", 0.01)
    Traceback (most recent call last):
    ...
    qfv_brevitas.util.errors.QfvError: unknown scenario kind 'bitflip'; choose one of faults, bitflips, variability
    """

    kind: str
    level: float
    chip_sigma: float = 0.0
    layer_shared_sigma: float = 0.0

    def __post_init__(self):
        check_choice(self.kind, SCENARIO_KINDS, "scenario kind")
        if self.kind == "variability":
            self.level = E._check_levels([self.level], "sigma/mu", None)[0]
        else:
            self.level = check_fraction(self.level, f"{self.kind} scenario level",
                                        " (a fraction of bit cells)")
        for name in ("chip_sigma", "layer_shared_sigma"):
            v = E._check_levels([getattr(self, name)], f"Scenario.{name}", None)[0]
            if v and self.kind != "variability":
                raise ValueError(f"Scenario.{name} applies to variability scenarios only, "
                                 f"not to {self.kind!r}")
            setattr(self, name, v)

    @property
    def label(self) -> str:
        pct = f"{100 * self.level:g}%"
        if self.kind == "faults":
            return f"stuck-at {pct}"
        if self.kind == "bitflips":
            return f"BER {pct}"
        out = f"LRS {pct}"
        if self.chip_sigma:
            out += f" + chip {100 * self.chip_sigma:g}%"
        if self.layer_shared_sigma:
            out += f" + layer {100 * self.layer_shared_sigma:g}%"
        return out

    def attach(self, model: nn.Module, seed: int, layers: str, sa1_fraction: float = 0.5
               ) -> None:
        """Put map (or flip stream) ``seed`` of this scenario on ``model``."""
        if self.kind == "faults":
            E._fault_sampler(sa1_fraction, layers)(model, self.level, seed)
        elif self.kind == "bitflips":
            _flip_sampler(layers)(model, self.level, seed)
        else:
            # Each trial is a new chip: shared components and devices both drawn from seed.
            E._variability_sampler(None, "normal", layers, self.chip_sigma,
                                   self.layer_shared_sigma, 1, seed)(model, self.level, seed)


def scenarios(stuck: Sequence[float] = (), ber: Sequence[float] = (),
              sigmas: Sequence[float] = (), chip_sigma: float = 0.0) -> List[Scenario]:
    """Scenarios from lists of stuck-at rates, bit-error rates and LRS sigmas; with
    ``chip_sigma > 0`` each sigma appears twice, without and with the between-chip component.

    >>> [s.label for s in scenarios(stuck=[0.1], ber=[0.01], sigmas=[0.2], chip_sigma=0.1)]
    ['stuck-at 10%', 'BER 1%', 'LRS 20%', 'LRS 20% + chip 10%']
    """
    out = [Scenario("faults", r) for r in stuck] + [Scenario("bitflips", r) for r in ber]
    for s in sigmas:
        out.append(Scenario("variability", s))
        if chip_sigma:
            out.append(Scenario("variability", s, chip_sigma=chip_sigma))
    return out


def _default_finetune() -> TrainConfig:
    return TrainConfig(epochs=2, lr=0.005, lambda_rise_epochs=1)


@dataclass
class CompareConfig:
    """Knobs of :func:`compare_methods`.

    Args:
        trials: maps (chips, flip streams) per scenario; trial ``k`` uses seed ``seed + k``.
        seed: first map seed; also seeds the calibration batch and the once-trained methods.
        finetune: training of every fine-tuning method (per map and once).
        selftune_on_top: also report each method after self-tuning.
        calib_size: unlabeled training images in the self-tuning calibration batch.
        selftune_passes: under transient bit flips, self-tuning pools each layer's statistics
            over this many calibration passes (flip draws); fixed maps need one.
        rbe_rate: bit-error rate of random-bit-error training.
        sam_rho: SAM radius of ``saq`` and ``saq_aware``.
        remap_every: nearest-valid remap period (epochs) of the fault-aware fine-tunes.
        layers: ``"inner"`` (8-bit first/last layers stay ideal) or ``"all"``.
        sa1_fraction: share of stuck cells stuck at 1.
    """

    trials: int = 10
    seed: int = 0
    finetune: TrainConfig = field(default_factory=_default_finetune)
    selftune_on_top: bool = True
    calib_size: int = 64
    selftune_passes: int = 8
    rbe_rate: float = 0.02
    sam_rho: float = 0.05
    remap_every: int = 4
    layers: str = "inner"
    sa1_fraction: float = 0.5

    def __post_init__(self):
        self.trials = E._check_trials(self.trials)
        self.seed = check_seed(self.seed, "CompareConfig.seed")
        if not isinstance(self.finetune, TrainConfig):
            raise ValueError(f"CompareConfig.finetune must be a TrainConfig, got "
                             f"{type(self.finetune).__name__}")
        if isinstance(self.calib_size, bool) or int(self.calib_size) != self.calib_size \
                or self.calib_size < 2:
            raise ValueError(f"CompareConfig.calib_size must be an integer >= 2 (unlabeled "
                             f"images for self-tuning), got {self.calib_size!r}")
        if isinstance(self.selftune_passes, bool) or int(self.selftune_passes) != \
                self.selftune_passes or self.selftune_passes < 1:
            raise ValueError(f"CompareConfig.selftune_passes must be an integer >= 1, got "
                             f"{self.selftune_passes!r}")
        self.rbe_rate = check_fraction(self.rbe_rate, "CompareConfig.rbe_rate",
                                       " (the training bit-error rate, e.g. 0.02)")
        if isinstance(self.sam_rho, bool) or not (isinstance(self.sam_rho, (int, float))
                                                   and math.isfinite(self.sam_rho)
                                                   and self.sam_rho > 0):
            raise ValueError(f"CompareConfig.sam_rho must be a finite number > 0 (the SAM "
                             f"radius, e.g. 0.05), got {self.sam_rho!r}")
        if isinstance(self.remap_every, bool) or int(self.remap_every) < 1:
            raise ValueError(f"CompareConfig.remap_every must be >= 1, got {self.remap_every}")
        check_choice(self.layers, E.LAYER_SETS, "layer set")
        self.sa1_fraction = check_fraction(self.sa1_fraction, "CompareConfig.sa1_fraction")

    def to_dict(self) -> dict:
        return asdict(self)


def check_methods(methods: Sequence[str]) -> List[str]:
    """``methods`` as a list without duplicates; a ValueError naming an unknown one.

    >>> check_methods(["paper", "gauss", "paper"])
    ['paper', 'gauss']
    """
    if isinstance(methods, str):
        methods = [methods]
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError(f"give at least one method; choose from {', '.join(METHODS)}")
    for m in methods:
        check_choice(m, METHODS, "method")
    return methods


@dataclass
class MethodComparison:
    """Accuracies of methods over scenarios and maps: ``rows`` of ``(scenario, kind, level,
    method, trial, seed, acc)``; the scenario ``"ideal device"`` holds each method's model on
    ideal hardware."""

    rows: List[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def methods(self) -> List[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    @property
    def scenario_labels(self) -> List[str]:
        return list(dict.fromkeys(r["scenario"] for r in self.rows))

    def summary(self) -> List[dict]:
        """Per (scenario, method): mean, std (sample), min, max of accuracy over the maps."""
        groups: Dict[tuple, List[float]] = {}
        for r in self.rows:
            groups.setdefault((r["scenario"], r["method"]), []).append(r["acc"])
        return [dict(scenario=sc, method=method, **E.accuracy_stats(accs))
                for (sc, method), accs in groups.items()]

    def winners(self, with_selftune: bool = True) -> Dict[str, List[str]]:
        """Per scenario (not the ideal device), the method(s) with the highest mean accuracy
        (all within 1e-9 of it); ``with_selftune=False`` leaves the self-tuned rows out."""
        best: Dict[str, List[str]] = {}
        by_sc: Dict[str, List[dict]] = {}
        for s in self.summary():
            if s["scenario"] == IDEAL:
                continue
            if not with_selftune and "selftune" in s["method"]:
                continue
            by_sc.setdefault(s["scenario"], []).append(s)
        for sc, items in by_sc.items():
            top = max(i["mean"] for i in items)
            best[sc] = [i["method"] for i in items if i["mean"] >= top - 1e-9]
        return best

    def table(self) -> str:
        """Markdown table: one row per method, one column per scenario, ``mean +- std (min)``
        in percent over the maps; the best mean of each scenario in bold, ``n/a`` where a
        method does not apply."""
        summ = {(s["scenario"], s["method"]): s for s in self.summary()}
        scs = self.scenario_labels
        best = self.winners()
        lines = ["| method | " + " | ".join(scs) + " |", "|---" * (len(scs) + 1) + "|"]
        for m in self.methods:
            cells = []
            for sc in scs:
                s = summ.get((sc, m))
                if s is None:
                    cells.append("n/a")
                    continue
                txt = (f"{100 * s['mean']:.2f}" if s["trials"] == 1 else
                       f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f} ({100 * s['min']:.2f})")
                cells.append(f"**{txt}**" if m in best.get(sc, ()) else txt)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save(self, out_dir: Union[str, Path], name: str = "compare", overwrite: bool = False
             ) -> Dict[str, Path]:
        """Write ``name.csv`` (every map), ``name.json`` (rows, summary, winners, meta),
        ``name.md`` (the table) and ``name.png`` (the plot), together and atomically
        (:mod:`qfv_brevitas.util.safeio`): existing files only with ``overwrite``."""
        out = Path(out_dir)
        paths = {k: out / f"{name}.{k}" for k in ("csv", "json", "md", "png")}
        fields = ["scenario", "kind", "level", "chip_sigma", "method", "trial", "seed", "acc"]
        with atomic_paths(list(paths.values()), overwrite=overwrite) as tmps:
            tmp = dict(zip(paths, tmps))
            with open(tmp["csv"], "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                for r in self.rows:
                    w.writerow({k: r.get(k) for k in fields})
            tmp["json"].write_text(json.dumps(
                {"meta": self.meta, "summary": self.summary(), "winners": self.winners(),
                 "winners_without_selftune": self.winners(False), "rows": self.rows},
                indent=2, default=str))
            tmp["md"].write_text(self.table() + "\n")
            self.plot(tmp["png"], overwrite=True, format="png")
        return paths

    def plot(self, path: Union[str, Path], overwrite: bool = False,
             format: Optional[str] = None) -> Path:
        """Grouped bars: one group per scenario, one bar per method (mean), error bar = std,
        a black tick at the worst map (atomically; an existing file only with ``overwrite``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        summ = {(s["scenario"], s["method"]): s for s in self.summary()}
        scs, methods = self.scenario_labels, self.methods
        width = 0.8 / max(len(methods), 1)
        fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(scs) * max(len(methods), 4) / 4 + 3),
                                        4.8))
        cmap = plt.get_cmap("tab20")
        for j, m in enumerate(methods):
            xs, ys, es, mins = [], [], [], []
            for i, sc in enumerate(scs):
                s = summ.get((sc, m))
                if s is None:
                    continue
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(100 * s["mean"])
                es.append(100 * s["std"])
                mins.append(100 * s["min"])
            ax.bar(xs, ys, width, yerr=es, capsize=1.5, label=m, color=cmap(j % 20))
            ax.plot(xs, mins, "k_", markersize=4)
        ax.set_xticks(range(len(scs)))
        ax.set_xticklabels(scs, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy (%): mean, std, worst map")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower left", bbox_to_anchor=(1.0, 0.0))
        from qfv_brevitas.studies.plots import save_figure

        return save_figure(fig, path, ax, self.meta.get("title", ""), title_size=9,
                           overwrite=overwrite, format=format)


def _apply(method: str, m: nn.Module, sc: Scenario, train: Dataset, cfg: CompareConfig
           ) -> None:
    """Fit the (copied) model ``m``, with the scenario's map attached, by a per-map method."""
    ft = cfg.finetune
    if method == "nearest_valid":
        set_deploy_mapping(m, "aware")
    elif method in ("paper", "gauss", "sin", "saq_aware"):
        shape = "sq" if method in ("paper", "saq_aware") else method
        run = replace(ft, reg_shape=shape, sam_rho=cfg.sam_rho if method == "saq_aware" else 0.0)
        if sc.kind == "faults":
            fault_aware_finetune(m, train, None, run, remap_every=cfg.remap_every,
                                 progress=False)
        else:
            variability_aware_finetune(m, train, None, run, progress=False)
    elif method == "chip_in_loop":
        chip_in_loop_finetune(m, train, None, replace(ft, sam_rho=0.0), progress=False)
        set_forward_mode(m, "paper")  # evaluation is the same in every mode


def _train_once(method: str, base: nn.Module, train: Dataset, cfg: CompareConfig
                ) -> nn.Module:
    m = copy.deepcopy(base)
    if method == "random_bit_error":
        exempt = E._exempt(m, cfg.layers)
        random_bit_error_finetune(m, train, None, replace(cfg.finetune, sam_rho=0.0),
                                  BitFlipModel(cfg.rbe_rate, cfg.seed, exempt), progress=False)
    else:  # saq
        fit(m, train, None, replace(cfg.finetune, sam_rho=cfg.sam_rho), desc="saq",
            progress=False)
    return m.eval()


def compare_methods(model: nn.Module, train: Dataset, test: Dataset,
                    scenario_list: Sequence[Scenario], methods: Sequence[str] = METHODS,
                    config: Optional[CompareConfig] = None, progress: bool = True,
                    workers: int = 1, distributed: bool = False, device=None
                    ) -> MethodComparison:
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
    methods = check_methods(methods)
    cfg = config or CompareConfig()
    if not isinstance(cfg, CompareConfig):
        raise TypeError(f"config must be a CompareConfig, got {type(cfg).__name__}")
    scenario_list = list(scenario_list)
    if not scenario_list:
        raise ValueError("give at least one Scenario (e.g. scenarios(stuck=[0.1]))")
    for sc in scenario_list:
        if not isinstance(sc, Scenario):
            raise TypeError(f"scenarios must be Scenario objects, got {type(sc).__name__}")
    if not nmult_layers(model):
        raise ValueError("the model has no N-multiplier layer to put on a chip")
    workers = check_workers(workers)
    base = E._on_device(model, device)
    base = copy.deepcopy(base).eval()
    set_deploy_mapping(base, "naive")

    plain = [m for m in methods if m != "selftune"]
    tuned: Dict[str, str] = {m: f"{m}+selftune" for m in plain} if cfg.selftune_on_top else {}
    if "selftune" in methods:
        tuned["none"] = "selftune"
    runs = plain + (["none"] if "none" in tuned and "none" not in plain else [])

    bar = RunProgress(len(scenario_list) * cfg.trials, "compare", unit="map",
                      enabled=progress and E._is_main_rank(distributed))
    starts: Dict[str, nn.Module] = {"base": base}
    for m in runs:
        if m in _ONCE:
            bar.set_phase(f"training {m}")
            starts[m] = _train_once(m, base, train, cfg)
    bar.set_phase("maps")
    calib = refs = None
    if tuned:
        calib = calibration_batch(train, cfg.calib_size, cfg.seed).to(model_device(base))
        refs = {k: reference_statistics(v, calib) for k, v in starts.items()}

    result = MethodComparison(meta={
        "methods": methods, "scenarios": [asdict(s) | {"label": s.label} for s in scenario_list],
        "config": cfg.to_dict(), "ideal_label": IDEAL})

    def row(sc: Optional[Scenario], method: str, k: int, acc: float) -> None:
        result.rows.append({
            "scenario": IDEAL if sc is None else sc.label,
            "kind": "ideal" if sc is None else sc.kind, "level": 0.0 if sc is None else sc.level,
            "chip_sigma": 0.0 if sc is None else sc.chip_sigma, "method": method, "trial": k,
            "seed": cfg.seed + k, "acc": acc})

    ideal_acc = {k: evaluate(v, test) for k, v in starts.items()}
    for m in plain:
        row(None, m, 0, ideal_acc[m if m in _ONCE else "base"])

    tasks = [(sc, k) for sc in scenario_list for k in range(cfg.trials)]

    def task(i: int) -> List[tuple]:
        """Rows (scenario, method, trial, acc) of one map: every method on it."""
        sc, k = tasks[i]
        seed = cfg.seed + k
        out = []
        for method in runs:
            if method not in APPLIES[sc.kind]:
                continue
            start = method if method in _ONCE else "base"
            m = copy.deepcopy(starts[start])
            sc.attach(m, seed, cfg.layers, cfg.sa1_fraction)
            if method in _PER_MAP:
                _apply(method, m, sc, train, cfg)
            acc = evaluate(m, test)
            if method in plain:
                out.append((method, acc))
            if method in tuned:
                self_tune(m, calib, refs[start],
                          passes=cfg.selftune_passes if sc.kind == "bitflips" else 1)
                if sc.kind == "bitflips":
                    # Restart the flip stream: the evaluation reads the same flips as the
                    # row without self-tuning (the calibration pass drew its own).
                    sc.attach(m, seed, cfg.layers, cfg.sa1_fraction)
                out.append((tuned[method], evaluate(m, test)))
        return out

    try:
        per_map = run_tasks(len(tasks), task, workers, distributed, bar)
    finally:
        bar.close()
    for (sc, k), rows in zip(tasks, per_map):
        for method, acc in rows:
            row(sc, method, k, acc)
    return result
    bar.close()
    return result
