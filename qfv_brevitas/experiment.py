"""The main job: full precision, then fixed-level, learned-step and N-multiplier QAT."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from .checkpoint import save_checkpoint
from .config import VARIANTS, NMultConfig
from .convert import quantize_model
from .data import load_dataset
from .models import build_model
from .plots import plot_levels
from .train import TrainConfig, evaluate, fit

__all__ = ["run_experiment", "format_results"]


def run_experiment(out_dir: Union[str, Path], dataset: str = "digits",
                   data_dir: Optional[str] = None, arch: str = "small_cnn",
                   bits: Sequence[int] = (4, 3), variants: Sequence[str] = ("fixed", "step", "nmult"),
                   mode: str = "paper", per_channel: bool = False,
                   fp_train: Optional[TrainConfig] = None, q_train: Optional[TrainConfig] = None,
                   seed: int = 0, progress: bool = True, save_models: bool = True,
                   init: Optional[str] = None) -> dict:
    """Train a float model, then QAT it at W{b}A{b} for each bit width and quantizer variant
    (levels initialised by ``init``, see :data:`qfv_brevitas.config.INITS`; ``None``: each
    variant's default).

    Writes ``results.json``, ``levels.png``, per N-multiplier model ``levels_fit_w{b}a{b}.png``
    (weight histogram per layer with its levels, the best uniform grid and Lloyd-Max) and
    (with ``save_models``) a checkpoint per model to ``out_dir``; returns the results.
    """
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown quantizer variant {v!r}; choose from {', '.join(VARIANTS)}")
    # Validate every configuration before spending time on the float model.
    configs = [NMultConfig(weight_bits=b, act_bits=b, variant=v, mode=mode, init=init,
                           per_channel=per_channel) for b in bits for v in variants]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test, num_classes, shape = load_dataset(dataset, data_dir, seed)
    fp_train = replace(fp_train or TrainConfig(epochs=30, lr=0.05), seed=seed)
    q_train = replace(q_train or TrainConfig(epochs=15, lr=0.01, lambda_rise_epochs=5), seed=seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    fp = build_model(arch, shape, num_classes)
    fit(fp, train, test, fp_train, desc="float", progress=progress)
    fp_acc = evaluate(fp, test)
    results = {"dataset": dataset, "arch": arch, "seed": seed, "num_train": len(train),
               "num_test": len(test), "fp_acc": fp_acc, "fp_train": asdict(fp_train),
               "q_train": asdict(q_train), "runs": []}
    if save_models:
        save_checkpoint(out / "float.pt", fp, arch, shape, num_classes, None, acc=fp_acc,
                        dataset=dataset, data_seed=seed)
    example = next(iter(DataLoader(train, batch_size=256)))[0]
    plotted: Dict[str, torch.nn.Module] = {}
    for cfg in configs:
        b, variant = cfg.weight_bits, cfg.variant
        q = quantize_model(copy.deepcopy(fp), cfg, example_input=example)
        hist = fit(q, train, test, q_train, desc=f"{variant} W{b}A{b}", progress=progress)
        acc = evaluate(q, test)
        results["runs"].append({"variant": variant, "weight_bits": b, "act_bits": b,
                                "mode": mode, "init": cfg.init, "per_channel": per_channel,
                                "acc": acc, "delta_vs_fp": acc - fp_acc, "history": hist})
        if variant == "nmult":
            from .plots import plot_fitted_levels

            plot_fitted_levels(q, out / f"levels_fit_w{b}a{b}.png")
        if save_models:
            save_checkpoint(out / f"{variant}_w{b}a{b}.pt", q, arch, shape, num_classes, cfg,
                            acc=acc, dataset=dataset, data_seed=seed)
        if variant == "nmult" or (variant == variants[-1] and "nmult" not in variants):
            plotted[f"{variant} W{b}A{b}"] = q
    results["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if plotted:
        plot_levels(plotted, out / "levels.png")
    return results


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
