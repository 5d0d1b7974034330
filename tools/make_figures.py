#!/usr/bin/env python3
"""Regenerate the small example figures of README's "Pictures" section (docs/figures/*.png)
from real, small runs on the bundled digits data (a few minutes on 2 CPU cores):

    PYTHONPATH=. .venv/bin/python tools/make_figures.py [--out docs/figures]

1. ``qfv train``'s run (:func:`qfv_brevitas.studies.experiment.run_experiment`): digits,
   small_cnn, fixed-level and N-multiplier QAT at W3A3 -> ``levels.png`` and
   ``levels_fit.png`` (the figures a run folder holds as ``levels.png`` and
   ``levels_fit_w3a3.png``; ``qfv quantize`` draws the same kind as ``<out>_levels.png``);
2. Monte Carlo sweeps of the N-multiplier model (what ``qfv faults|variability|bitflips eval``
   and ``qfv faults compare`` draw): ``faults.png`` (no correction and nearest valid level),
   ``variability.png`` (sigma 0 to 0.4 with an HRS leak of 1/10), ``bitflips.png``;
3. ``compare.png``: the ten library methods (and each after self-tuning) side by side
   (what ``qfv compare`` draws), one short fine-tune epoch per method.

Seeds are fixed (experiment seed 0, map seeds 0..trials-1); figures are written at 80 dpi.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qfv_brevitas.studies import plots
from qfv_brevitas.studies.compare import compare_methods
from qfv_brevitas.studies.engine import CompareConfig, run_study
from qfv_brevitas.studies.experiment import run_experiment
from qfv_brevitas.studies.methods import METHODS
from qfv_brevitas.studies.montecarlo import evaluate_bitflips
from qfv_brevitas.studies.scenario import Scenario, scenarios
from qfv_brevitas.training.train import TrainConfig
from qfv_brevitas.zoo.checkpoint import load_checkpoint
from qfv_brevitas.zoo.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
DPI = 80
MODEL = "small_cnn on digits"


def save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def train_models(work: Path) -> dict:
    """Float, then fixed-level and N-multiplier QAT at W3A3 (a few epochs)."""
    run_experiment(work / "run", dataset="digits", bits=(3,), variants=("fixed", "nmult"),
                   fp_train=TrainConfig(epochs=4, lr=0.05),
                   q_train=TrainConfig(epochs=3, lr=0.01, lambda_rise_epochs=1), seed=0,
                   progress=False)
    return {v: load_checkpoint(work / "run" / f"{v}_w3a3.pt")[0].eval()
            for v in ("fixed", "nmult")}


def sweeps(model, train, test, out: Path) -> None:
    """The Monte Carlo figures by level: faults (two deployments), variability with HRS,
    bit flips."""
    cfg = CompareConfig(trials=5, seed=0, selftune_on_top=False)
    faults = run_study(model, None, test, [Scenario("faults", r) for r in (0, .05, .1, .2)],
                       ["none", "nearest_valid"], cfg, kind="faults", progress=False)
    faults.meta["model"] = MODEL
    save(faults.figure(), out / "faults.png")
    var = run_study(model, None, test, [Scenario("variability", s, hrs_on_off=10)
                                        for s in (0, 0.1, 0.2, 0.4)],
                    ["none", "nearest_valid"], cfg, kind="variability", progress=False)
    var.meta["model"] = MODEL + ", HRS leak 1/10"
    save(var.figure(), out / "variability.png")
    flips = evaluate_bitflips(model, test, [0, 0.01, 0.02, 0.05], trials=5, progress=False)
    flips.meta["model"] = MODEL
    save(flips.figure(), out / "bitflips.png")


def comparison(model, train, test, out: Path) -> None:
    """The ten methods on four scenarios, two maps each, one fine-tune epoch."""
    cfg = CompareConfig(trials=2, seed=0, finetune=TrainConfig(epochs=1, lr=0.005,
                                                               lambda_rise_epochs=1))
    res = compare_methods(model, train, test, scenarios([0.1], [0.01], [0.2], chip_sigma=0.1),
                          list(METHODS), cfg, progress=False)
    res.meta["model"] = MODEL
    save(res.figure(), out / "compare.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = train_models(Path(tmp))
    save(plots.levels_figure({"fixed-level W3A3": models["fixed"],
                              "N-multiplier W3A3": models["nmult"]}), args.out / "levels.png")
    save(plots.fitted_levels_figure(models["nmult"]), args.out / "levels_fit.png")
    train, test, _, _ = load_dataset("digits", None, 0)
    sweeps(models["nmult"], train, test, args.out)
    comparison(models["nmult"], train, test, args.out)


if __name__ == "__main__":
    main()
