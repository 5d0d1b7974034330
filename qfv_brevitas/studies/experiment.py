"""The main job: full precision, then fixed-level, learned-step and N-multiplier QAT."""
from __future__ import annotations

import copy
import json
import re
import stat
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from qfv_brevitas.zoo.checkpoint import save_checkpoint
from qfv_brevitas.core.config import VARIANTS, NMultConfig
from qfv_brevitas.core.convert import quantize_model
from qfv_brevitas.zoo.data import DataError, fingerprint, load_dataset
from qfv_brevitas.zoo.models import build_model
from qfv_brevitas.studies.figstyle import VARIANT_LABELS
from qfv_brevitas.studies.plots import plot_fitted_levels, plot_levels
from qfv_brevitas.util.progress import RunProgress
from qfv_brevitas.util.budgets import read_json_file
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.safeio import atomic_dir, atomic_write, check_output
from qfv_brevitas.training.train import TrainConfig, evaluate, fit

__all__ = ["run_experiment", "format_results", "check_model_fits", "not_a_run_folder",
           "ExperimentPlan", "ExperimentData", "plan_experiment", "float_model", "run_bar",
           "train_float", "train_quantized", "shows_levels", "accuracy_table"]


@dataclass(frozen=True)
class ExperimentPlan:
    """:func:`run_experiment`'s arguments, checked and resolved (:func:`plan_experiment`)
    before any data is read or any model trained: one QAT run per entry of ``configs``."""

    dataset: str
    arch: str
    seed: int
    mode: str
    per_channel: bool
    variants: Tuple[str, ...]
    configs: Tuple[NMultConfig, ...]
    fp_train: TrainConfig
    q_train: TrainConfig
    save_models: bool
    device: torch.device


@dataclass(frozen=True)
class ExperimentData:
    """The data set of an experiment (:func:`load_dataset`) and what its checkpoints record."""

    train: Dataset
    test: Dataset
    num_classes: int
    shape: tuple


def plan_experiment(dataset: str, arch: str, bits: Sequence[int], variants: Sequence[str],
                    mode: str, per_channel: bool, fp_train: Optional[TrainConfig],
                    q_train: Optional[TrainConfig], seed: int, save_models: bool, device,
                    init: Optional[str], frac_bits=None) -> ExperimentPlan:
    """The :class:`ExperimentPlan` of :func:`run_experiment`'s arguments: every configuration
    is validated before time is spent on the float model."""
    for v in variants:
        if v not in VARIANTS:
            raise QfvError(f"unknown quantizer variant {v!r}; choose from {', '.join(VARIANTS)}")
    if not len(bits):
        raise QfvError("bits is empty: give at least one bit width, e.g. bits=(4,)")
    configs = tuple(NMultConfig(weight_bits=b, act_bits=b, variant=v, mode=mode, init=init,
                                per_channel=per_channel, frac_bits=frac_bits)
                    for b in bits for v in variants)
    fp_train = replace(fp_train or TrainConfig(epochs=30, lr=0.05), seed=seed)
    q_train = replace(q_train or TrainConfig(epochs=15, lr=0.01, lambda_rise_epochs=5), seed=seed)
    return ExperimentPlan(
        dataset=dataset, arch=arch, seed=seed, mode=mode, per_channel=per_channel,
        variants=tuple(variants), configs=configs, fp_train=fp_train, q_train=q_train,
        save_models=save_models,
        device=torch.device(device) if device is not None else torch.device("cpu"))


def float_model(plan: ExperimentPlan, data: ExperimentData, threads) -> torch.nn.Module:
    """The untrained float model of ``plan`` (seeded), checked against the data's input
    shape, on ``plan.device``; sets the run's intra-op ``threads`` (see
    :func:`run_experiment`)."""
    torch.manual_seed(plan.seed)
    fp = build_model(plan.arch, data.shape, data.num_classes)
    check_model_fits(fp, plan.arch, data.shape, data.num_classes)
    if threads is not None:
        from qfv_brevitas.util.threads import auto_threads, set_threads

        example = next(iter(DataLoader(data.train, batch_size=1)))[0]
        set_threads(auto_threads(fp, example, plan.fp_train.batch_size) if threads == "auto"
                    else int(threads))
    return fp.to(plan.device)


def run_bar(plan: ExperimentPlan, num_train: int, progress: bool) -> RunProgress:
    """One progress bar over every training batch of the run (float, then each QAT run)."""
    per_epoch = -(-num_train // plan.fp_train.batch_size)
    per_q_epoch = -(-num_train // plan.q_train.batch_size)
    return RunProgress(plan.fp_train.epochs * per_epoch
                       + len(plan.configs) * plan.q_train.epochs * per_q_epoch,
                       "qfv", enabled=progress)


def train_float(plan: ExperimentPlan, data: ExperimentData, fp: torch.nn.Module, out: Path,
                bar: RunProgress) -> Tuple[dict, dict]:
    """Train the float model ``fp`` in place (and save it); the results dictionary so far
    and the data entries every checkpoint of the run records."""
    fit(fp, data.train, data.test, plan.fp_train, desc="float", progress=bar)
    fp_acc = evaluate(fp, data.test)
    results = {"dataset": plan.dataset, "arch": plan.arch, "seed": plan.seed,
               "num_train": len(data.train), "num_test": len(data.test), "fp_acc": fp_acc,
               "fp_train": asdict(plan.fp_train), "q_train": asdict(plan.q_train), "runs": [],
               "files": ["results.json"]}
    meta = dict(dataset=plan.dataset, data_seed=plan.seed,
                data_sha256=fingerprint(data.train, data.test))
    if plan.save_models:
        save_checkpoint(out / "float.pt", fp, plan.arch, data.shape, data.num_classes, None,
                        acc=fp_acc, **meta)
        results["files"].append("float.pt")
    return results, meta


def train_quantized(plan: ExperimentPlan, data: ExperimentData, fp: torch.nn.Module,
                    cfg: NMultConfig, example: torch.Tensor, out: Path, bar: RunProgress,
                    results: dict, meta: dict) -> torch.nn.Module:
    """QAT of a copy of ``fp`` with ``cfg``; its run and files are added to ``results`` (an
    N-multiplier model also draws its fitted levels). Returns the trained model."""
    b, variant = cfg.weight_bits, cfg.variant
    q = quantize_model(copy.deepcopy(fp), cfg, example_input=example).to(plan.device)
    hist = fit(q, data.train, data.test, plan.q_train, desc=f"{variant} W{b}A{b}", progress=bar)
    acc = evaluate(q, data.test)
    results["runs"].append({"variant": variant, "weight_bits": b, "act_bits": b,
                            "mode": plan.mode, "init": cfg.init,
                            "per_channel": plan.per_channel, "acc": acc,
                            "delta_vs_fp": acc - results["fp_acc"], "history": hist})
    if plan.save_models:
        name = f"{variant}_w{b}a{b}.pt"
        save_checkpoint(out / name, q, plan.arch, data.shape, data.num_classes, cfg, acc=acc,
                        **meta)
        results["files"].append(name)
    if variant == "nmult":
        name = f"levels_fit_w{b}a{b}.png"
        plot_fitted_levels(q, out / name)
        results["files"].append(name)
    return q


def shows_levels(plan: ExperimentPlan, variant: str) -> bool:
    """Whether ``levels.png`` draws the runs of ``variant``: the N-multiplier ones, or the
    last variant's when there is none."""
    return variant == "nmult" or (variant == plan.variants[-1] and "nmult" not in plan.variants)


def run_experiment(out_dir: Union[str, Path], dataset: str = "digits",
                   data_dir: Optional[str] = None, arch: str = "small_cnn",
                   bits: Sequence[int] = (4, 3), variants: Sequence[str] = ("fixed", "step", "nmult"),
                   mode: str = "paper", per_channel: bool = False,
                   fp_train: Optional[TrainConfig] = None, q_train: Optional[TrainConfig] = None,
                   seed: int = 0, progress: bool = True, save_models: bool = True,
                   device=None, threads=None, overwrite: bool = False,
                   init: Optional[str] = None, frac_bits=None) -> dict:
    """Train a float model, then QAT it at W{b}A{b} for each bit width and quantizer variant
    (levels initialised by ``init``, see :data:`qfv_brevitas.core.config.INITS`; ``None``: each
    variant's default; ``frac_bits``: the integer view, see :class:`NMultConfig`).

    Writes ``results.json``, ``levels.png``, per N-multiplier model ``levels_fit_w{b}a{b}.png``
    (weight histogram per layer with its levels, the best uniform grid and Lloyd-Max) and
    (with ``save_models``) a checkpoint per model to ``out_dir``; returns the results
    dictionary. ``progress`` shows one bar (or log lines) over every batch of the run.
    ``device``: where to train (default CPU). ``threads``: intra-op threads for the run
    (``"auto"``: :func:`qfv_brevitas.util.threads.auto_threads`; ``None``: torch's setting as it is).

    The run folder is written whole (:func:`qfv_brevitas.util.safeio.atomic_dir`): it is built
    beside ``out_dir`` and swapped in at the end, so ``out_dir`` holds the previous run or this
    one, never a mix, whatever interrupts the run. An existing run folder is replaced only with
    ``overwrite=True``; a folder holding other files is refused. Data and configuration are
    checked first.
    """
    plan = plan_experiment(dataset, arch, bits, variants, mode, per_channel, fp_train, q_train,
                           seed, save_models, device, init, frac_bits)
    check_output(out_dir, overwrite=overwrite, inputs=[data_dir], kind="dir",
                 replaceable=not_a_run_folder)
    data = ExperimentData(*load_dataset(dataset, data_dir, seed))
    fp = float_model(plan, data, threads)
    bar = run_bar(plan, len(data.train), progress)
    with atomic_dir(out_dir, overwrite=overwrite, inputs=[data_dir],
                    replaceable=not_a_run_folder) as out:
        t0 = time.perf_counter()
        results, meta = train_float(plan, data, fp, out, bar)
        example = next(iter(DataLoader(data.train, batch_size=256)))[0].to(plan.device)
        plotted: Dict[str, torch.nn.Module] = {}
        for cfg in plan.configs:
            q = train_quantized(plan, data, fp, cfg, example, out, bar, results, meta)
            if shows_levels(plan, cfg.variant):
                label = VARIANT_LABELS.get(cfg.variant, cfg.variant)
                plotted[f"{label} W{cfg.weight_bits}A{cfg.weight_bits}"] = q
        bar.close()
        if plotted:
            plot_levels(plotted, out / "levels.png")
            results["files"].append("levels.png")
        results["seconds"] = time.perf_counter() - t0
        atomic_write(out / "results.json", json.dumps(results, indent=2))
    return results


#: Names a run folder holds (what run_experiment and run_snn_experiment write).
_RUN_FILES = re.compile(
    r"^(results\.json|levels\.png|levels_fit_w\d+a\d+\.png|float\.pt|"
    r"(fixed|step|nmult)_w\d+(a\d+)?\.pt)$")


def not_a_run_folder(folder: Path) -> Optional[str]:
    """Why ``folder`` may not be replaced by a new run (None if it holds only a run's files:
    those its ``results.json`` lists, or the names runs write)."""
    try:
        listed = set(read_json_file(folder / "results.json", error=QfvError,
                                    what="a run's results.json",
                                    follow_links=False).get("files", []))
    except (QfvError, AttributeError, TypeError):
        listed = set()
    other = sorted(p.name for p in folder.iterdir()
                   if p.name not in listed and not _RUN_FILES.match(p.name)
                   or not stat.S_ISREG(p.lstat().st_mode))  # a run writes regular files only
    if other:
        return (f"it holds files that are not from a qfv run ({', '.join(other[:5])}"
                f"{', ...' if len(other) > 5 else ''}); move them or choose another folder")
    return None


def check_model_fits(model: torch.nn.Module, arch: str, shape,
                     num_classes: Optional[int] = None) -> None:
    """One blank sample through ``model`` before any training: inputs too small for the
    architecture (e.g. 1x1 images through pooling layers) are a clear error here, and so
    (with ``num_classes``) is an output that is not one score per class (a user's model
    built for other data)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape))
        if num_classes is not None and (not isinstance(out, torch.Tensor)
                                        or tuple(out.shape) != (1, num_classes)):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(f"model {arch} gives {got} for one input of shape {tuple(shape)}, "
                            f"but the data set has {num_classes} classes: it must give "
                            f"(1, {num_classes}), one score per class")
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"--model {arch} cannot take inputs of shape {tuple(shape)} from this "
                        f"data set ({first[:160]}); use larger images or a smaller model such "
                        "as mlp") from None
    finally:
        model.train(was)


def format_results(results: dict) -> str:
    """Accuracy table: one row per (bits, variant) against full precision."""
    return accuracy_table(
        f"dataset {results['dataset']} ({results['num_train']} train / {results['num_test']} "
        f"test), model {results['arch']}, seed {results['seed']}", "float", results,
        lambda r: f"{r['variant']} W{r['weight_bits']}A{r['act_bits']}")


def accuracy_table(title: str, fp_name: str, results: dict, run_name) -> str:
    """``title``, then the float model (``results["fp_acc"]``) and each of ``results["runs"]``
    (named by ``run_name(run)``) with its accuracy and its change against float."""
    lines = [title, f"{'model':<22} {'accuracy':>9} {'vs float':>9}", "-" * 42,
             f"{fp_name:<22} {100 * results['fp_acc']:>8.2f}% {'':>9}"]
    for r in results["runs"]:
        lines.append(f"{run_name(r):<22} {100 * r['acc']:>8.2f}% "
                     f"{100 * r['delta_vs_fp']:>+8.2f}")
    return "\n".join(lines)
