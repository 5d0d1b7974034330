"""Language models on real text: train a small transformer on the standard library's
sources, quantize it after training (fitted N-multiplier levels against Brevitas' uniform MSE
and GPTQ), fine-tune it quantized (paper / STE regularizer modes against stock Brevitas QAT),
and put it on an imperfect chip (stuck bits, variability, fault-aware repair). Every score
is validation bits per byte (:mod:`qfv_brevitas.training.lm`; lower is better).

Works on the project's :class:`~qfv_brevitas.zoo.lm.TinyLM` and on Hugging Face decoder
models built from a config (the ``llm`` extra), any model mapping ``(batch, time)`` ids to
logits or to an output with ``.logits``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from qfv_brevitas.core.config import NMultConfig
from qfv_brevitas.core.convert import quantize_model
from qfv_brevitas.core.levels import check_bits
from qfv_brevitas.training.lm import LM_METRICS, evaluate_bpb, lm_loss
from qfv_brevitas.training.train import TrainConfig, fit
from qfv_brevitas.util.configbase import QfvConfig
from qfv_brevitas.util.validate import check_choice

__all__ = ["LMRecipe", "lm_optimizer", "train_lm", "lm_nmult_config", "QAT_METHODS",
           "qat_lm", "ptq_lm", "chip_sweep_lm", "fault_repair_lm"]

#: quantization-aware fine-tuning methods of :func:`qat_lm`: the regularizer in the paper's
#: mode (float weights in training, levels at evaluation), the regularizer with the levels in
#: the forward pass (``both``: STE plus regularizer), the levels with a straight-through
#: gradient and no regularizer (``ste``), and stock Brevitas (uniform per-channel weight
#: quantizer, plain STE)
QAT_METHODS = ("paper", "both", "ste", "brevitas")


@dataclass
class LMRecipe(QfvConfig):
    """How :func:`train_lm` trains a language model (and :func:`qat_lm` fine-tunes one):
    AdamW at ``lr`` with one cosine decay, ``weight_decay`` on the matrices, ``epochs`` over
    the training windows in batches of ``batch_size``, seeded by ``seed``."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        from qfv_brevitas.util.validate import check_int, check_real

        self.epochs = check_int(self.epochs, "LMRecipe.epochs", 1)
        self.batch_size = check_int(self.batch_size, "LMRecipe.batch_size", 1)
        self.lr = check_real(self.lr, "LMRecipe.lr", strict=True)
        self.weight_decay = check_real(self.weight_decay, "LMRecipe.weight_decay")
        self.seed = check_int(self.seed, "LMRecipe.seed", -2 ** 63)

    def train_config(self, **kw) -> TrainConfig:
        """The :class:`TrainConfig` of :func:`fit` with these settings (``kw`` override)."""
        return TrainConfig(**{**dict(epochs=self.epochs, batch_size=self.batch_size,
                                     lr=self.lr, weight_decay=self.weight_decay,
                                     seed=self.seed), **kw})


def lm_optimizer(groups: List[dict], lr: float) -> torch.optim.Optimizer:
    """One AdamW over :func:`~qfv_brevitas.training.train.param_groups`' groups (the quantizer
    group keeps its own learning rate and no decay), betas (0.9, 0.95) as for GPT models."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_lm(model: nn.Module, train: Dataset, val: Optional[Dataset],
             recipe: Optional[LMRecipe] = None, progress: bool = True,
             desc: str = "train LM", cfg: Optional[TrainConfig] = None) -> Dict[str, list]:
    """Train (or fine-tune) ``model`` on next-byte prediction with :func:`fit`: the LM loss,
    AdamW (:func:`lm_optimizer`), validation bits per byte each epoch (``test_bpb`` in the
    returned history). With N-multiplier layers the regularizer and refits of ``cfg`` apply
    (``cfg``: default ``recipe.train_config()``)."""
    recipe = recipe or LMRecipe()
    cfg = cfg or recipe.train_config()
    return fit(model, train, val, cfg, desc=desc, progress=progress, loss_fn=lm_loss,
               optimizer=partial(lm_optimizer, lr=cfg.lr), metrics=LM_METRICS)


def lm_nmult_config(bits: int, mode: str = "paper", per_channel: bool = True,
                    edge_bits: Optional[int] = 8) -> NMultConfig:
    """The N-multiplier settings for a language model: ``bits`` on the attention and MLP
    projections, per output channel by default, the embedding and LM head (the first and last
    layers in execution order) at ``edge_bits``; weights only, levels fitted."""
    return NMultConfig(weight_bits=check_bits(bits, "LM weight bits"), act_bits=None,
                       mode=mode, init="fit", per_channel=per_channel,
                       first_last_bits=edge_bits)


def _example(data: Dataset) -> torch.Tensor:
    return data[0][0][None]


def qat_lm(float_model: nn.Module, train: Dataset, val: Dataset, bits: int,
           method: str = "paper", recipe: Optional[LMRecipe] = None,
           per_channel: bool = True, progress: bool = True, **train_kw):
    """Quantization-aware fine-tuning of a trained float LM at ``bits``: ``method`` in
    :data:`QAT_METHODS`. The same float start, steps, data order and optimizer for every
    method; ``train_kw`` override :class:`TrainConfig` fields (e.g. ``refit_every``). Returns
    ``(model, history)``; ``float_model`` is left unchanged."""
    check_choice(method, QAT_METHODS, "QAT method")
    recipe = recipe or LMRecipe(lr=1e-3)
    if method == "brevitas":
        from qfv_brevitas.studies.ptq import brevitas_uniform

        q = brevitas_uniform(float_model, bits, per_channel=per_channel, first_last_bits=8,
                             example_input=_example(val), scale="max")
    else:
        q = quantize_model(float_model, lm_nmult_config(bits, method, per_channel),
                           example_input=_example(val))
    hist = train_lm(q, train, val, recipe, progress, desc=f"QAT W{bits} {method}",
                    cfg=recipe.train_config(**train_kw))
    return q.eval(), hist


def ptq_lm(float_model: nn.Module, calib: Dataset, val: Dataset, bits: int,
           compensation: Optional[str] = None, per_channel: bool = True,
           calib_samples: int = 128, baseline: str = "mse", progress: bool = False,
           errors: bool = False):
    """Post-training quantization of a float LM at ``bits``, scored in validation bits per
    byte: fitted N-multiplier levels against Brevitas' uniform quantizer (``baseline`` scale,
    same granularity), both with ``compensation`` (``"gptq"``: Brevitas' GPTQ over
    ``calib_samples`` training windows) or none. Returns the
    :class:`~qfv_brevitas.studies.ptq.PTQResult` (``acc``, ``baseline_acc``, ``float_acc``
    hold bits per byte; ``metric="bpb"``; with ``errors`` its ``layers`` hold each layer's
    weight error against the best uniform grid, :func:`~qfv_brevitas.studies.ptq.level_errors`)."""
    from qfv_brevitas.studies.ptq import quantize_post_training

    return quantize_post_training(
        float_model, bits, per_channel, first_last_bits=8, data=val, lloyd=False,
        baseline=baseline, batch_size=64, calib_data=calib if compensation else None,
        calib_samples=calib_samples, compensation=compensation, metric="bpb",
        progress=progress, errors=errors)


def _summary(values: Sequence[float]) -> dict:
    """:func:`~qfv_brevitas.studies.results.accuracy_stats` of the scores, with the standard
    error of their mean (``sem``)."""
    from qfv_brevitas.studies.results import accuracy_stats

    stats = accuracy_stats(list(values))
    return {**stats, "sem": stats["std"] / math.sqrt(stats["trials"])}


def chip_sweep_lm(model: nn.Module, val: Dataset, kind: str, levels: Sequence[float],
                  trials: int = 5, seed: int = 0, layers: str = "inner", mapping: str = "naive",
                  progress: bool = True,
                  score: Optional[Callable[[nn.Module, Dataset], float]] = None
                  ) -> List[dict]:
    """Monte Carlo of a quantized LM on an imperfect chip: for each level of ``kind``
    (``"faults"``: stuck-cell fraction, ``"variability"``: LRS sigma, ``"bitflips"``: bit-error
    rate) ``trials`` maps (trial ``k`` from seed ``seed + k``, as in
    :mod:`qfv_brevitas.studies.montecarlo`), each attached, scored (default: validation bits
    per byte) and detached. ``mapping``: ``"naive"`` or ``"aware"`` (nearest valid level).
    Returns one row per level: ``{"kind", "level", "mapping", "bpb": [...], **summary}``."""
    from qfv_brevitas.chip.repair import set_deploy_mapping
    from qfv_brevitas.studies.scenario import Scenario, check_levels
    from qfv_brevitas.util.progress import RunProgress

    check_choice(mapping, ("naive", "aware"), "deploy mapping")
    levels = check_levels(levels, f"{kind} levels", None if kind == "variability" else 1.0)
    score = score or evaluate_bpb
    rows = []
    with RunProgress(len(levels) * trials, f"{kind} on the LM", unit="map",
                     enabled=progress) as bar:
        for level in levels:
            sc, vals = Scenario(kind, level), []
            if sc.is_ideal:  # no map to draw: every trial is the model as it is
                vals = [score(model, val)] * trials
                bar.update(trials)
            for t in range(0 if sc.is_ideal else trials):
                m = sc.attach(copy.deepcopy(model), seed, t, layers)
                set_deploy_mapping(m, mapping)
                vals.append(score(m, val))
                bar.update(1)
            rows.append({"kind": kind, "level": level, "mapping": mapping, "bpb": vals,
                         **_summary(vals)})
    return rows


def fault_repair_lm(model: nn.Module, train: Dataset, val: Dataset, rate: float,
                    seed: int = 0, recipe: Optional[LMRecipe] = None, layers: str = "inner",
                    progress: bool = True) -> dict:
    """The fault-aware repair of a quantized LM for one chip's stuck-at map (``rate``,
    ``seed``): validation bits per byte ideal, deployed naively, with nearest-valid-level
    mapping, and after :func:`~qfv_brevitas.chip.repair.fault_aware_finetune` (``recipe``:
    short, at a low learning rate). ``model`` is left unchanged."""
    from qfv_brevitas.chip.repair import fault_aware_finetune, set_deploy_mapping
    from qfv_brevitas.studies.scenario import Scenario

    recipe = recipe or LMRecipe(lr=3e-4)
    out = {"rate": float(rate), "seed": int(seed), "ideal": evaluate_bpb(model, val)}
    m = Scenario("faults", rate).attach(copy.deepcopy(model), seed, 0, layers)
    out["naive"] = evaluate_bpb(set_deploy_mapping(m, "naive"), val)
    out["aware"] = evaluate_bpb(set_deploy_mapping(m, "aware"), val)
    fault_aware_finetune(m, train, None, recipe.train_config(), progress=progress,
                         loss_fn=lm_loss, optimizer=partial(lm_optimizer, lr=recipe.lr))
    out["repaired"] = evaluate_bpb(m, val)
    out["model"] = m
    return out
