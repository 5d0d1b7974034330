"""The spiking job: a full-precision spiking model, then its N-multiplier weight QAT."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import TensorDataset

from qfv_brevitas.zoo.checkpoint import save_checkpoint
from qfv_brevitas.core.config import VARIANTS, NMultConfig
from qfv_brevitas.core.convert import quantize_model
from qfv_brevitas.zoo.data import fingerprint
from qfv_brevitas.studies.experiment import accuracy_table, not_a_run_folder
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.safeio import atomic_dir, atomic_write, check_output
from qfv_brevitas.util.validate import check_choice
from qfv_brevitas.training.train import TrainConfig, evaluate, fit
from qfv_brevitas.snn.config import SpikingConfig
from qfv_brevitas.snn.data import load_snn_dataset
from qfv_brevitas.snn.models import SPIKING_MODEL_NAMES, build_spiking_model
from qfv_brevitas.snn.network import snn_export_metadata

__all__ = ["run_snn_experiment", "format_snn_results", "snn_for_data"]


def snn_for_data(config: SpikingConfig, temporal: bool) -> SpikingConfig:
    """``config`` adapted to a data set: event data brings its own time axis in batch-first
    batches (``encoding="none"``, ``layout="batch_first"``); static images keep the config's
    encoding (``"none"`` is turned into ``"rate"``, as they need one)."""
    if temporal:
        return replace(config, encoding="none", layout="batch_first")
    if config.encoding == "none":
        return replace(config, encoding="rate")
    return config


def _check_fits(model: torch.nn.Module, arch: str, data) -> None:
    """One sample through the model before any training: a model too deep for the frame size
    (e.g. VGG-11's five poolings on 16x16 frames) fails here with a message, not mid-epoch."""
    x = data.train[0][0].unsqueeze(0)
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as e:
        raise QfvError(f"{arch} does not fit samples of shape {tuple(x.shape[1:])} from this "
                         f"data set ({e}); choose a smaller model or larger frames") from e
    finally:
        model.train()


def run_snn_experiment(out_dir: Union[str, Path], dataset: str = "digits",
                       data_dir: Optional[str] = None, arch: str = "spiking_small_cnn",
                       snn: Optional[SpikingConfig] = None, bits: Sequence[int] = (4,),
                       variant: Union[str, Sequence[str]] = NMultConfig.variant,
                       per_channel: bool = NMultConfig.per_channel,
                       first_last_bits: Optional[int] = NMultConfig.first_last_bits, fp_train: Optional[TrainConfig] = None,
                       q_train: Optional[TrainConfig] = None, seed: int = 0,
                       frame_size: int = 48, progress: bool = True,
                       save_models: bool = True, overwrite: bool = False) -> dict:
    """Train a full-precision spiking model, then give its weights N-multiplier quantizers at
    each of ``bits`` (spikes are the activations: ``act_bits=None``) and QAT it with the
    regularizer and its lambda schedule (the paper's SNN setup, section 4.2); ``variant`` is
    one quantizer variant or several (each at each width, from the same float model).

    Writes ``results.json`` and (with ``save_models``) ``float.pt`` and
    ``{variant}_w{b}.pt`` checkpoints that :func:`qfv_brevitas.zoo.checkpoint.load_checkpoint`
    and the ``qfv faults`` / ``qfv variability`` commands read; returns the results.
    The run folder is written whole, as by :func:`qfv_brevitas.studies.experiment.run_experiment`
    (the previous run or this one, never a mix; an existing one only with ``overwrite``).
    """
    check_choice(arch, SPIKING_MODEL_NAMES, "spiking model")
    variants = [variant] if isinstance(variant, str) else list(variant)
    if not variants:
        raise QfvError("variant is empty: give at least one quantizer variant, e.g. 'nmult'")
    for v in variants:
        check_choice(v, VARIANTS, "quantizer variant")
    configs = [NMultConfig(weight_bits=b, act_bits=None, variant=v, per_channel=per_channel,
                           first_last_bits=first_last_bits) for v in variants for b in bits]
    if not configs:
        raise QfvError("bits is empty: give at least one weight bit width, e.g. bits=(4,)")
    snn = snn or SpikingConfig()
    check_output(out_dir, overwrite=overwrite, inputs=[data_dir], kind="dir",
                 replaceable=not_a_run_folder)
    data = load_snn_dataset(dataset, data_dir, seed, T=snn.T, size=frame_size)
    snn = snn_for_data(snn, data.temporal)
    fp_train = replace(fp_train or TrainConfig(), seed=seed)
    q_train = replace(q_train or TrainConfig(epochs=10, lr=0.01, lambda_rise_epochs=4), seed=seed)
    torch.manual_seed(seed)
    fp = build_spiking_model(arch, data.input_shape, data.num_classes, snn)
    _check_fits(fp, arch, data)
    with atomic_dir(out_dir, overwrite=overwrite, inputs=[data_dir],
                    replaceable=not_a_run_folder) as out:
        t0 = time.perf_counter()
        fit(fp, data.train, data.test, fp_train, desc="float spiking", progress=progress)
        fp_acc = evaluate(fp, data.test)
        meta = dict(dataset=dataset, data_seed=seed, snn=snn.to_dict())
        if isinstance(data.train, TensorDataset) and isinstance(data.test, TensorDataset):
            meta["data_sha256"] = fingerprint(data.train, data.test)
        results = {"dataset": dataset, "arch": arch, "seed": seed,
                   "num_train": len(data.train), "num_test": len(data.test),
                   "snn": snn.to_dict(), "fp_acc": fp_acc, "fp_train": fp_train.to_dict(),
                   "q_train": q_train.to_dict(), "runs": [], "neurons": snn_export_metadata(fp),
                   "files": ["results.json"]}
        if save_models:
            save_checkpoint(out / "float.pt", fp, arch, data.input_shape, data.num_classes,
                            None, acc=fp_acc, **meta)
            results["files"].append("float.pt")
        for cfg in configs:
            q = quantize_model(copy.deepcopy(fp), cfg)
            hist = fit(q, data.train, data.test, q_train,
                       desc=f"{cfg.variant} W{cfg.weight_bits}", progress=progress)
            acc = evaluate(q, data.test)
            results["runs"].append({"variant": cfg.variant, "weight_bits": cfg.weight_bits,
                                    "first_last_bits": first_last_bits,
                                    "per_channel": per_channel, "acc": acc,
                                    "delta_vs_fp": acc - fp_acc, "history": hist})
            if save_models:
                name = f"{cfg.variant}_w{cfg.weight_bits}.pt"
                save_checkpoint(out / name, q, arch, data.input_shape, data.num_classes, cfg,
                                acc=acc, **meta)
                results["files"].append(name)
        results["seconds"] = time.perf_counter() - t0
        atomic_write(out / "results.json", json.dumps(results, indent=2))
    return results


def format_snn_results(results: dict) -> str:
    """Accuracy table: the full-precision spiking model and each quantized one."""
    s = results["snn"]
    return accuracy_table(
        f"dataset {results['dataset']} ({results['num_train']} train / {results['num_test']} "
        f"test), model {results['arch']}, T={s['T']}, tau={s['tau']} (beta={1 / s['tau']:g}), "
        f"encoding {s['encoding']}, seed {results['seed']}", "float spiking", results,
        lambda r: f"{r['variant']} W{r['weight_bits']} spiking")
