"""Levels fitted to a model's weights: post-training quantization (no training), per-layer
errors against the best uniform grid and Lloyd-Max, and the stock Brevitas uniform-quantizer
baseline.

The math is in :mod:`qfv_brevitas.core.fitting` (pure torch); this module applies it to the
N-multiplier layers of a Brevitas model (the in-place refit that training runs is
:func:`qfv_brevitas.training.refit.refit_levels_`).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from qfv_brevitas.core import fitting as FIT
from qfv_brevitas.core import levels as L
from qfv_brevitas.core.config import NMultConfig
from qfv_brevitas.core.convert import (ConversionError, build_quant_layer, edge_layers,
                                      probe_layers, quantize_model, set_submodule,
                                      swap_weight_quant)
from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.util.progress import RunProgress
from qfv_brevitas.core.quantizers import nmult_layers, quant_of

__all__ = ["level_errors", "format_level_errors", "quantize_post_training",
           "PTQResult", "PTQError", "brevitas_uniform", "float_state_dict",
           "float_model_of_checkpoint", "read_model_file"]


class PTQError(QfvError):
    """A model or file that post-training quantization cannot take (``qfv`` exit 2)."""


@torch.no_grad()
def level_errors(model: nn.Module, lloyd: bool = True) -> List[dict]:
    """Per N-multiplier layer: the mean squared error of the weights to the layer's levels,
    of the best uniform grid of the same bits and granularity, of LSQ's grid and (with
    ``lloyd``) of ``2**N`` free levels (Lloyd-Max, the reference), and the multipliers'
    departure from a uniform grid (``max_i |r_i / (r_0 2**i) - 1|``, worst group)."""
    rows = []
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        w2d = tq.to_groups(layer.weight.detach())
        n = w2d.numel()
        lv = tq.levels().detach()
        mse = float(FIT.grid_error(w2d, lv).sum()) / n
        uni = float(FIT.best_uniform_grid(w2d, tq.bits).error.sum()) / n
        lsq = L.uniform_multipliers(L.lsq_step_init(w2d, tq.bits), tq.bits)
        lsq_mse = float(FIT.grid_error(w2d, L.level_table(*lsq)).sum()) / n
        lm = float(FIT.lloyd_max(w2d, tq.bits, init=lv).error.sum()) / n if lloyd else math.nan
        r = tq.multipliers().detach()
        nonuni = float(FIT.nonuniformity(r).max()) if tq.bits > 1 else 0.0
        rows.append({"layer": name, "bits": tq.bits, "variant": tq.variant,
                     "per_channel": tq.per_channel, "num_weights": n,
                     "mean_square": float(w2d.double().pow(2).mean()), "mse": mse,
                     "uniform_mse": uni, "lsq_mse": lsq_mse, "lloyd_mse": lm,
                     "vs_uniform": _ratio(mse, uni), "vs_lloyd": _ratio(mse, lm),
                     "nonuniformity": nonuni})
    return rows


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def _fmt_ratio(a: float, b: float, scale: float) -> str:
    """``a / b``, or ``-`` where ``b`` is zero up to rounding (e.g. Lloyd-Max with at least
    as many levels as weights per group)."""
    if math.isnan(b) or b <= 1e-9 * scale:
        return "-"
    return f"{a / b:.3f}"


def format_level_errors(rows: List[dict]) -> str:
    """A fixed-width table of :func:`level_errors` rows."""
    lw = max([5] + [len(r["layer"]) for r in rows])
    head = (f"{'layer':<{lw}} {'bits':>4} {'gran':<7} {'weights':>8} {'MSE':>10} "
            f"{'x uniform':>9} {'x Lloyd':>8} {'x LSQ grid':>10} {'non-unif':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        scale = r["mean_square"]
        lines.append(
            f"{r['layer']:<{lw}} {r['bits']:>4} {'channel' if r['per_channel'] else 'tensor':<7} "
            f"{r['num_weights']:>8} {r['mse']:>10.3e} "
            f"{_fmt_ratio(r['mse'], r['uniform_mse'], scale):>9} "
            f"{_fmt_ratio(r['mse'], r['lloyd_mse'], scale):>8} "
            f"{_fmt_ratio(r['mse'], r['lsq_mse'], scale):>10} {r['nonuniformity']:>8.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Post-training quantization
# ----------------------------------------------------------------------------------------

def float_state_dict(obj, where: str = "checkpoint") -> Dict[str, Tensor]:
    """The float tensors of a state dict (or of a ``{"state_dict": ...}`` wrapper), checked to
    hold at least one floating-point weight matrix; a clear :class:`PTQError` otherwise."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"],
                                                                       Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise PTQError(f"{where}: expected a state dict (a mapping of names to tensors), got "
                       f"{type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not any(v.is_floating_point() and v.dim() >= 2 for v in tensors.values()):
        raise PTQError(f"{where}: holds no float weights (no floating-point tensor with 2 or "
                       "more dimensions); post-training quantization needs a trained float "
                       "model's state dict")
    return tensors


def _load_float_weights(model: nn.Module, state: Mapping, where: str) -> nn.Module:
    """Load the float weights of ``state`` (a float or a quantized model's state dict) into
    the plain torch ``model``: every float parameter and buffer must be there."""
    state = float_state_dict(state, where)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise PTQError(f"{where}: does not fit the model: missing {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise PTQError(f"{where}: does not fit the model: shapes differ for {bad[:5]}")
    model.load_state_dict({k: state[k] for k in own})
    return model


def _is_brevitas(model: nn.Module) -> bool:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return any(isinstance(m, QuantWeightBiasInputOutputLayer) for m in model.modules())


def _accuracy(model: nn.Module, data, batch_size: int) -> float:
    from qfv_brevitas.training.train import evaluate

    return evaluate(model, data, batch_size)


def _bits_per_byte(model: nn.Module, data, batch_size: int) -> float:
    from qfv_brevitas.training.lm import evaluate_bpb

    return evaluate_bpb(model, data, batch_size)


#: how :func:`quantize_post_training` scores a model on ``data``: name -> (score(model, data,
#: batch_size), format); ``accuracy`` (top-1, higher is better) or ``bpb`` (a language
#: model's bits per byte, lower is better)
PTQ_METRICS = {"accuracy": (_accuracy, lambda v: f"{100 * v:.2f}%"),
               "bpb": (_bits_per_byte, lambda v: f"{v:.4f} bits/byte")}


@dataclass
class PTQResult:
    """What :func:`quantize_post_training` made: the quantized ``model``, its ``config``,
    per-layer weight errors (:func:`level_errors`) and, with data, the accuracies of the float
    model, of the fitted model and of Brevitas' uniform weight quantizer at the same bits and
    granularity (``baseline_acc``; the model itself: ``baseline_model``); ``meta``: the
    toolbox steps (``act_bits``, ``compensation``, ``bias_correction``, ``calib_samples``)."""

    model: nn.Module
    config: NMultConfig
    layers: List[dict]
    float_acc: Optional[float] = None
    acc: Optional[float] = None
    baseline_acc: Optional[float] = None
    baseline: str = ""
    meta: dict = field(default_factory=dict)
    baseline_model: Optional[nn.Module] = None
    #: what ``float_acc``, ``acc`` and ``baseline_acc`` measure: a key of :data:`PTQ_METRICS`
    metric: str = "accuracy"

    def table(self) -> str:
        lines = [format_level_errors(self.layers)] if self.layers else []
        if self.acc is not None:
            fmt = PTQ_METRICS[self.metric][1]
            lines += ["", f"{self.metric}: float {fmt(self.float_acc)}"
                          + (f" | Brevitas {self.baseline} {fmt(self.baseline_acc)}"
                             if self.baseline_acc is not None else "")
                          + f" | fitted N-multiplier{_steps_label(self.meta, ' (')}"
                            f" {fmt(self.acc)}"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "layers": self.layers,
                "float_acc": self.float_acc, "acc": self.acc,
                "baseline_acc": self.baseline_acc, "baseline": self.baseline,
                "metric": self.metric, **self.meta}

    def plot(self, path: Union[str, Path], **kw) -> Path:
        """Weight histogram with the fitted, best uniform and Lloyd-Max levels, a panel per
        layer (:func:`qfv_brevitas.studies.plots.plot_fitted_levels`)."""
        from qfv_brevitas.studies.plots import plot_fitted_levels  # matplotlib only when drawing

        return plot_fitted_levels(self.model, path, **kw)


def quantize_post_training(source: Union[nn.Module, Mapping, str, Path], bits: int,
                           per_channel: bool = NMultConfig.per_channel, *,
                           model: Optional[nn.Module] = None,
                           first_last_bits: Optional[int] = NMultConfig.first_last_bits, data=None,
                           example_input: Optional[Tensor] = None, skip: Sequence[str] = (),
                           lloyd: bool = True, baseline: Optional[str] = "mse",
                           batch_size: int = 512, act_bits: Optional[int] = None,
                           calib_data=None, calib_samples: int = 256,
                           compensation: Optional[str] = None,
                           bias_correction: bool = False, progress: bool = False,
                           metric: str = "accuracy", errors: bool = True) -> PTQResult:
    """Quantize a trained float model's weights to fitted N-multiplier levels, no training;
    optionally with Brevitas' PTQ toolbox (:mod:`qfv_brevitas.studies.calibration`) over
    calibration data: activations at ``act_bits``, GPTQ/GPFQ error compensation, bias correction.

    Args:
        source: a plain torch model (Conv/Linear layers become Brevitas layers with float
            activations), a Brevitas model (its weight quantizers are swapped, activation
            quantizers kept), a state dict (loaded into ``model``), or the path of a ``qfv``
            checkpoint (float or quantized: its float weights are quantized afresh) or of a
            ``torch.save``-d state dict (with ``model``).
        bits: N, weight bits of the inner layers (1..8); first and last compute layers get
            ``first_last_bits`` (``None``: like the others) for weights and activations.
        per_channel: one ``(r, c)`` per output channel.
        model: the plain torch model a state dict is loaded into (not modified).
        data: optional test set (a Dataset of ``(x, y)``): accuracy before and after, and of
            the Brevitas baseline; its first batch finds the first/last layers in execution
            order unless ``example_input`` is given.
        lloyd: compute the Lloyd-Max reference per layer (a little slower).
        baseline: ``"mse"`` (Brevitas' MSE weight scale, the default), ``"max"`` (its max-abs
            statistics) or ``None``: the stock Brevitas uniform quantizer at the same bits and
            granularity, given the same activation quantizers and toolbox steps (so with
            ``compensation="gptq"`` it is Brevitas' GPTQ on the uniform grid), on ``data``.
        act_bits: input activations of the inner layers quantized by Brevitas at this many
            bits (plain torch sources; calibrated on ``calib_data``); ``None``: float.
        calib_data: a Dataset (training data, not the test set) whose first ``calib_samples``
            inputs calibrate activations and drive compensation and bias correction.
        compensation: ``"gptq"``, ``"gpfq"`` or ``None``.
        bias_correction: Brevitas' bias correction after the other steps.
        progress: one bar over the steps (fit, toolbox, errors, evaluations).
        metric: how the models are scored on ``data`` (:data:`PTQ_METRICS`): ``"accuracy"``
            or ``"bpb"`` (language models: ``data`` of ``(ids, next ids)`` windows).
        errors: compute the per-layer level errors (:func:`level_errors`: a best uniform grid
            per layer and group as the reference, slow for many 8-bit groups); ``False``:
            ``layers`` is empty.

    Returns a :class:`PTQResult`; ``source`` is left unchanged.
    """
    bits, first_last_bits = _check_widths(bits, first_last_bits, metric)
    steps = _toolbox_steps(act_bits, calib_data, calib_samples, compensation, bias_correction)
    float_model = _resolve_source(source, model)
    if _is_brevitas(float_model):
        baseline = None  # the uniform baseline is built from a plain torch model only
        if steps["act_bits"] is not None:
            raise PTQError("act_bits: a Brevitas model keeps its own activation quantizers; "
                           "act_bits applies to a plain torch model")
    if example_input is None:
        example_input = _first_batch(data, batch_size) if data is not None else \
            (steps["batches"] or [None])[0]
    config = NMultConfig(weight_bits=bits, act_bits=steps["act_bits"], variant="nmult",
                         mode="paper", init="fit", per_channel=per_channel,
                         first_last_bits=first_last_bits)
    with RunProgress(total=3 + (data is not None) * (2 + 2 * (baseline is not None)),
                     desc=f"quantize W{bits}", unit="step", enabled=progress,
                     brief=True) as bar:
        bar.set_phase("fit the levels")
        q = _nmult_model(float_model, config, example_input, skip)
        bar.update(1)
        bar.set_phase(_steps_label(steps, first="").strip() or "toolbox steps (none)")
        _apply_steps(q, steps)
        bar.update(1)
        bar.set_phase("level errors" + (" and Lloyd-Max references" if lloyd else ""))
        result = PTQResult(q, config, level_errors(q, lloyd=lloyd) if errors else [],
                           meta=_steps_meta(steps), metric=metric)
        bar.update(1)
        if data is not None:
            _evaluate_ptq(result, float_model, data, bits, per_channel, first_last_bits,
                          example_input, baseline, skip, steps, batch_size, bar)
    return result


def _check_widths(bits, first_last_bits, metric: str):
    """:func:`quantize_post_training`'s widths checked (and its metric's name)."""
    from qfv_brevitas.util.validate import check_choice

    check_choice(metric, tuple(PTQ_METRICS), "PTQ metric")
    if first_last_bits is not None:
        first_last_bits = L.check_bits(first_last_bits, "quantize_post_training: first_last_bits")
    return L.check_bits(bits, "quantize_post_training: bits"), first_last_bits


def _evaluate_ptq(result: PTQResult, float_model: nn.Module, data, bits: int, per_channel: bool,
                  first_last_bits, example_input, baseline, skip, steps: dict, batch_size: int,
                  bar: RunProgress) -> None:
    """The scores (``result.metric``) of :func:`quantize_post_training`: float, fitted levels
    and (with ``baseline``) Brevitas' uniform quantizer with the same steps."""
    evaluate = partial(PTQ_METRICS[result.metric][0], batch_size=batch_size)
    bar.set_phase("evaluate the float model")
    result.float_acc = evaluate(float_model, data)
    bar.update(1)
    bar.set_phase("evaluate the fitted levels")
    result.acc = evaluate(result.model, data)
    bar.update(1)
    if baseline is None:
        return
    bar.set_phase(f"Brevitas uniform baseline ({baseline} scale)")
    base = brevitas_uniform(float_model, bits, per_channel=per_channel,
                            act_bits=steps["act_bits"], first_last_bits=first_last_bits,
                            example_input=example_input, scale=baseline, skip=tuple(skip))
    result.baseline_model = _apply_steps(base, steps)
    bar.update(1)
    bar.set_phase("evaluate the baseline")
    result.baseline_acc = evaluate(base, data)
    result.baseline = f"uniform ({baseline} scale{_steps_label(steps)})"
    bar.update(1)


def _toolbox_steps(act_bits, calib_data, calib_samples: int, compensation,
                   bias_correction: bool) -> dict:
    """The toolbox options checked, and the calibration batches when a step needs them."""
    from qfv_brevitas.studies.calibration import COMPENSATIONS, calibration_batches
    from qfv_brevitas.util.validate import check_choice

    if act_bits is not None:
        act_bits = L.check_bits(act_bits, "quantize_post_training: act_bits")
    if compensation is not None:
        check_choice(compensation, COMPENSATIONS, "error compensation")
    steps = {"act_bits": act_bits, "compensation": compensation,
             "bias_correction": bool(bias_correction), "batches": []}
    wanted = [n for n, on in (("act_bits", act_bits is not None),
                              ("compensation", compensation is not None),
                              ("bias_correction", bias_correction)) if on]
    if wanted:
        if calib_data is None:
            raise PTQError(f"{', '.join(wanted)} need calibration data: pass calib_data=... "
                           "(training data, not the test set)")
        steps["batches"] = calibration_batches(calib_data, calib_samples)
    steps["calib_samples"] = sum(len(x) for x in steps["batches"])
    return steps


def _nmult_model(float_model: nn.Module, config: NMultConfig, example_input,
                 skip: Sequence[str]) -> nn.Module:
    """The fitted N-multiplier model of ``float_model`` (a new model, eval mode)."""
    if _is_brevitas(float_model):
        names = [n for n, _ in _brevitas_layers(float_model)]
        edge = ({names[0], names[-1]} if config.first_last_bits is not None and names
                else set())
        config.layer_bits = {n: config.first_last_bits for n in edge}
        q = swap_weight_quant(copy.deepcopy(float_model), config)
    else:
        q = quantize_model(float_model, config, example_input=example_input, skip=tuple(skip))
    return q.eval()


def _apply_steps(model: nn.Module, steps: dict) -> nn.Module:
    from qfv_brevitas.studies.calibration import apply_toolbox

    if not steps["batches"]:
        return model.eval()
    return apply_toolbox(model, steps["batches"], calibrate=steps["act_bits"] is not None,
                         compensation=steps["compensation"],
                         bias_correction=steps["bias_correction"])


def _steps_meta(steps: dict) -> dict:
    return {"act_bits": steps["act_bits"], "compensation": steps["compensation"],
            "bias_correction": steps["bias_correction"],
            "calib_samples": steps["calib_samples"]}


def _steps_label(steps: dict, first: str = ", ") -> str:
    """``", A8, GPTQ, bias corrected"``: the toolbox steps a model went through (``first``
    before the first one; ``" ("`` closes the parenthesis)."""
    parts = ([f"A{steps['act_bits']}"] if steps.get("act_bits") is not None else []) + \
        ([steps["compensation"].upper()] if steps.get("compensation") else []) + \
        (["bias corrected"] if steps.get("bias_correction") else [])
    if not parts:
        return ""
    return first + ", ".join(parts) + (")" if first.endswith("(") else "")


def _brevitas_layers(model: nn.Module):
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, QuantWeightBiasInputOutputLayer)]


def _first_batch(data, batch_size: int) -> Tensor:
    from torch.utils.data import DataLoader

    x = next(iter(DataLoader(data, batch_size=min(batch_size, 256))))
    return x[0] if isinstance(x, (list, tuple)) else x


def _resolve_source(source, model: Optional[nn.Module]) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, (str, Path)):
        kind, obj = read_model_file(source)
        if kind == "checkpoint":
            return obj[0]
        if model is None:
            raise PTQError(f"{source}: not a qfv checkpoint; a plain state dict needs the model "
                           "it belongs to (model=..., or --model on the command line)")
        return _load_float_weights(copy.deepcopy(model), obj, str(source))
    if isinstance(source, Mapping):
        if model is None:
            raise PTQError("a state dict needs the model it belongs to: pass model=...")
        return _load_float_weights(copy.deepcopy(model), source, "state dict")
    raise PTQError(f"cannot quantize a {type(source).__name__}: pass a model, a state dict or "
                   "a checkpoint path")


def read_model_file(path: Union[str, Path], allow_import=False):
    """Read a model file safely: ``("checkpoint", (float model, info))`` for a ``qfv``
    checkpoint (:func:`float_model_of_checkpoint`: checksum and structure checked), else
    ``("state", obj)`` for a ``torch.save``-d state dict. Loaded with ``weights_only=True``:
    a file holding Python objects that loading would run is refused before any of it runs.
    ``allow_import``: see :func:`~qfv_brevitas.zoo.checkpoint.load_checkpoint`."""
    from qfv_brevitas.zoo.checkpoint import FORMAT, LEGACY_FORMATS, weights_only_load

    path = Path(path)
    if path.is_dir():
        raise PTQError(f"{path}: is a folder, not a model file")
    if not path.is_file():
        raise PTQError(f"{path}: no such file")
    obj = weights_only_load(path, PTQError, what="checkpoint or state dict",
                            holds="a state dict or qfv checkpoint")
    if isinstance(obj, Mapping) and obj.get("format") in (FORMAT, *LEGACY_FORMATS):
        return "checkpoint", float_model_of_checkpoint(path, allow_import)
    return "state", obj


def float_model_of_checkpoint(path: Union[str, Path], allow_import=False):
    """``(float model, info)`` of a ``qfv`` checkpoint: a float checkpoint as it is; a
    quantized one rebuilt as its float architecture with its full-precision weights (the
    weights it trains, before snapping)."""
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.models import build_model

    model, info = load_checkpoint(path, allow_import)
    if info["config"] is None:
        return model, info
    fp = build_model(info["arch"], tuple(info["input_shape"]), info["num_classes"],
                     snn=(info.get("meta") or {}).get("snn"))
    _load_float_weights(fp, model.state_dict(), str(path))
    fp.eval()
    return fp, info


def brevitas_uniform(model: nn.Module, weight_bits: int,
                     per_channel: bool = NMultConfig.per_channel, act_bits: Optional[int] = None,
                     first_last_bits: Optional[int] = NMultConfig.first_last_bits,
                     example_input: Optional[Tensor] = None, scale: str = "max",
                     skip: Sequence[str] = ()) -> nn.Module:
    """The stock Brevitas baseline for a plain torch model: the same layers as
    :func:`qfv_brevitas.quantize_model` makes, with Brevitas' own uniform weight quantizer
    (``Int8WeightPerTensorFloat`` / ``Int8WeightPerChannelFloat`` at ``weight_bits``: scale from
    the largest magnitude; ``scale="mse"``: the ``...FloatMSE`` variants) and, with
    ``act_bits``, Brevitas' learned-scale activation quantizers (``Uint8ActPerTensorFloat``
    where inputs are never negative, else ``Int8ActPerTensorFloat``). First and last compute
    layers at ``first_last_bits`` (:func:`~qfv_brevitas.core.convert.edge_layers`: also every
    embedding, a ``QuantEmbedding`` without input quantizer). Returns a new model (in eval
    mode if ``model`` is)."""
    from brevitas.quant import (Int8ActPerTensorFloat, Int8WeightPerChannelFloat,
                                Int8WeightPerChannelFloatMSE, Int8WeightPerTensorFloat,
                                Int8WeightPerTensorFloatMSE, Uint8ActPerTensorFloat)

    quants = {("max", False): Int8WeightPerTensorFloat, ("max", True): Int8WeightPerChannelFloat,
              ("mse", False): Int8WeightPerTensorFloatMSE,
              ("mse", True): Int8WeightPerChannelFloatMSE}
    if (scale, bool(per_channel)) not in quants:
        raise QfvError(f"brevitas_uniform: scale must be 'max' or 'mse', got {scale!r}")
    weight_bits = L.check_bits(weight_bits, "brevitas_uniform: weight_bits")
    if _is_brevitas(model):
        raise ConversionError("brevitas_uniform takes a plain torch model")
    q = copy.deepcopy(model)
    order, observed = probe_layers(q, example_input)
    names = [n for n in order if n not in set(skip)]
    if not names:
        raise ConversionError("the model has no Conv1d/Conv2d/Conv3d/Linear layer to quantize")
    edge = edge_layers(q, names) if first_last_bits is not None else set()
    mods = dict(q.named_modules())
    for name in names:
        wbits = first_last_bits if name in edge else weight_bits
        wq = quants[(scale, bool(per_channel))].let(bit_width=wbits)
        act, abits = None, None
        if act_bits is not None:
            act = Uint8ActPerTensorFloat if observed.get(name, False) else Int8ActPerTensorFloat
            abits = first_last_bits if name in edge else act_bits
        # adopt: ``q`` is a copy already, and a tied embedding / LM head stays one Parameter
        set_submodule(q, name, build_quant_layer(name, mods[name], wq, act, abits, adopt=True))
    return q
