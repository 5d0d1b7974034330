"""Run an exported file three ways (torch, qonnx's ``execute_onnx``, onnxruntime) and compare."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.export.checks import compare_graphs, graph_problems
from qfv_brevitas.export.deadline import DEFAULT_TIME_LIMIT_S, Stopper, call_with_deadline
from qfv_brevitas.export.errors import ExportFileError
from qfv_brevitas.export.forms import form_named
from qfv_brevitas.export.graph import constant_tensors, to_onnxruntime
from qfv_brevitas.export.metadata import graph_intact, read_export, read_metadata
from qfv_brevitas.export.structure import shown
from qfv_brevitas.snn.network import spiking_net

__all__ = ["VerifyReport", "verify_qonnx", "reference_weights"]


@dataclass
class VerifyReport:
    """Differences between the torch model and the exported file on the same inputs.

    ``weight_diff``: per layer, max |torch weight - weight the file computes| (qonnx).
    ``torch_vs_qonnx`` / ``torch_vs_ort`` / ``qonnx_vs_ort``: max |output difference|;
    ``agreement``: per pair, the fraction of inputs whose top-1 class agrees (for
    non-classifier outputs: whose outputs agree within ``tolerance``).

    Passed when every weight difference is within ``weight_tolerance`` (0.0: bit-exact unless a
    variability map is in the file) and, for float activations, every output difference within
    ``tolerance``. With quantized activations the three runtimes accumulate in different orders
    and a pre-activation within float rounding of a quantizer threshold rounds differently
    (one quantization step, a sign for binary activations), so there the check is that every
    pair agrees on at least ``min_agreement`` of the inputs; the maximal differences are
    reported as measured.
    """

    form: str
    samples: int
    weight_diff: Dict[str, float]
    weight_tolerance: float
    torch_vs_qonnx: float
    torch_vs_ort: float
    qonnx_vs_ort: float
    tolerance: float
    agreement: Dict[str, float]
    quantized_activations: bool
    min_agreement: float = 1.0
    passed: bool = field(default=False)
    #: where the graph differs from its metadata or checksum, or (given a fresh export of the
    #: checkpoint) from that export, parameter by parameter; must be empty to pass
    graph_diff: List[str] = field(default_factory=list)

    @property
    def argmax_agreement(self) -> float:
        return min(self.agreement.values())

    def first_failure(self) -> str:
        """The first reason it failed, in one line ("" if it passed)."""
        if self.graph_diff:
            return f"graph: {self.graph_diff[0]}"
        bad = [k for k, d in self.weight_diff.items() if d > self.weight_tolerance]
        if bad:
            return (f"weights of layer {bad[0]!r} differ by {self.weight_diff[bad[0]]:.3g} "
                    f"(tolerance {self.weight_tolerance:.3g})")
        if self.quantized_activations and self.argmax_agreement < self.min_agreement:
            return (f"top-1 agreement {100 * self.argmax_agreement:.2f}% < "
                    f"{100 * self.min_agreement:.0f}%")
        worst = max(self.torch_vs_qonnx, self.torch_vs_ort, self.qonnx_vs_ort)
        if not self.quantized_activations and worst > self.tolerance:
            return f"outputs differ by {worst:.3g} (tolerance {self.tolerance:.3g})"
        return ""

    def summary(self) -> str:
        wmax = max(self.weight_diff.values()) if self.weight_diff else 0.0
        verdict = "PASSED" if self.passed else "FAILED"
        acts = "quantized" if self.quantized_activations else "float"
        agree = ", ".join(f"{k.replace('_', ' ')} {100 * v:.2f}%" for k, v in self.agreement.items())
        rule = (f"every output within {self.tolerance:.3g}" if not self.quantized_activations
                else f"each pair agrees on >= {100 * self.min_agreement:.0f}% of inputs")
        return (f"verify ({self.form}, {self.samples} inputs, {acts} activations): {verdict}\n"
                f"  weights: max |torch - file| over {len(self.weight_diff)} layers = {wmax:.3g} "
                f"(tolerance {self.weight_tolerance:.3g})\n"
                f"  outputs: max |diff| torch vs qonnx {self.torch_vs_qonnx:.3g}, torch vs "
                f"onnxruntime {self.torch_vs_ort:.3g}, qonnx vs onnxruntime "
                f"{self.qonnx_vs_ort:.3g}\n"
                f"  agreement: {agree} (rule: {rule})"
                + "".join(f"\n  graph: {d}" for d in self.graph_diff))

    def to_dict(self) -> dict:
        return dict(asdict(self), argmax_agreement=self.argmax_agreement)


@torch.no_grad()
def reference_weights(model: nn.Module, info: dict) -> Dict[str, Tensor]:
    """What the torch model computes with, per exported layer (its weight quantizer's eval
    output; for a fixed-point reference the stored fixed-point weights)."""
    mods = dict(model.named_modules())
    out = {}
    for row in info["layers"]:
        layer = mods.get(row["layer"])
        if layer is None:
            raise QfvError(f"the model has no layer {row['layer']!r} from the file: is it the "
                           "model that was exported?")
        proxy = layer.weight_quant
        # The quantizer itself (eval: snapped, or the device's values), not the proxy, whose
        # output type depends on Brevitas' quant-tensor settings.
        w = proxy.tensor_quant(layer.weight)[0] if proxy.is_quant_enabled else layer.weight
        out[row["layer"]] = w.detach().float().cpu()
    return out


def _chunks(x: Tensor, batch: int, axis: int = 0):
    for a in range(0, x.shape[axis], batch):
        part = x.narrow(axis, a, min(batch, x.shape[axis] - a))
        n = part.shape[axis]
        if n < batch:  # the graph's batch is static: pad, then drop the padding
            pad = list(part.shape)
            pad[axis] = batch - n
            part = torch.cat([part, part.new_zeros(pad)], dim=axis)
        yield part, n


@torch.no_grad()
def verify_qonnx(reference: nn.Module, source: Union[str, Path, onnx.ModelProto], inputs: Tensor,
                 tolerance: Optional[float] = None, weight_tolerance: Optional[float] = None,
                 min_agreement: Optional[float] = None,
                 expected: Optional[onnx.ModelProto] = None,
                 time_limit: Optional[float] = DEFAULT_TIME_LIMIT_S,
                 where: Optional[str] = None) -> VerifyReport:
    """Compare ``reference`` (the torch model the file was exported from) with the file.

    Default tolerances: weights bit-exact (0.0), or 1e-6 of the largest weight when the file
    holds a variability map (the per-cell deviations are summed in another order). Outputs:
    ``1e-4 * max(1, max|y|)`` (Conv/Gemm accumulate in another order than torch: measured
    ~2e-7 relative). With quantized activations: top-1 agreement of every pair of runtimes on
    at least ``min_agreement`` (default 98%) of the inputs; see :class:`VerifyReport`.

    Besides the outputs, the graph itself is checked: against its metadata and the checksum
    stored at export, and, given ``expected`` (the export of the checkpoint with the file's
    settings, :func:`~qfv_brevitas.export.api.expected_export`), parameter by parameter and
    exactly: weights, biases, codes, activation scales, zero points, bit widths, thresholds.

    A path is read once by :func:`~qfv_brevitas.export.metadata.read_export` (the file's
    structure checked before anything runs it); the graph then runs in a worker thread,
    stopped after ``time_limit`` seconds (:class:`~qfv_brevitas.export.errors.ExecutionTimeout`;
    None: no limit) or on Ctrl-C (:mod:`qfv_brevitas.export.deadline`). ``where`` names a
    given model in messages (a path names itself).
    """
    _check_settings(inputs, tolerance=tolerance, weight_tolerance=weight_tolerance,
                    min_agreement=min_agreement, time_limit=time_limit)
    model, info = _load(source)
    where = where or ("the file" if isinstance(source, onnx.ModelProto) else str(source))
    structural = graph_problems(model, info)
    graph_diff = compare_graphs(expected, model) if expected is not None else []
    graph_diff += structural
    if not graph_intact(model):
        graph_diff.append("the graph does not match the checksum stored at export (edited or "
                          "damaged)")
    if structural:  # e.g. a code out of range: the graph is not even well formed; do not run it
        nan = float("nan")
        return VerifyReport(form=str(info.get("form")), samples=0, weight_diff={},
                            weight_tolerance=0.0, torch_vs_qonnx=nan, torch_vs_ort=nan,
                            qonnx_vs_ort=nan, tolerance=0.0, agreement={"torch_vs_qonnx": 0.0},
                            quantized_activations=False, graph_diff=graph_diff, passed=False)
    reference = reference.eval()
    snn = spiking_net(reference)
    # spiking models in the time-first layout take (T, N, ...): the batch is axis 1
    axis = 1 if snn is not None and snn.config.layout == "time_first" else 0
    t, q, o, weights_file = call_with_deadline(
        _RunThree(reference, model, info, inputs, axis, where), time_limit,
        f"{where}: running the graph")
    ref_w = reference_weights(reference, info)
    wdiff = {k: float(np.abs(weights_file[k].astype(np.float64)
                             - ref_w[k].numpy().astype(np.float64)).max())
             for k in ref_w}
    has_var = any(r.get("variability") for r in info["layers"])
    if weight_tolerance is None:
        wmax = max(float(w.abs().max()) for w in ref_w.values())
        weight_tolerance = 1e-6 * wmax if has_var else 0.0
    # Spikes are binary activations: a membrane potential within float rounding of the
    # threshold fires in one runtime and not in another, as at a quantizer threshold.
    act = _has_activation_quant(model) or snn is not None
    if tolerance is None:
        tolerance = 1e-4 * max(1.0, float(np.abs(t).max()))
    if min_agreement is None:
        min_agreement = 0.98 if act else 1.0
    rep = VerifyReport(
        form=info["form"], samples=int(t.shape[0]), weight_diff=wdiff,
        weight_tolerance=float(weight_tolerance),
        torch_vs_qonnx=float(np.abs(t - q).max()), torch_vs_ort=float(np.abs(t - o).max()),
        qonnx_vs_ort=float(np.abs(q - o).max()), tolerance=float(tolerance),
        agreement={"torch_vs_qonnx": _agreement(t, q, tolerance),
                   "torch_vs_ort": _agreement(t, o, tolerance),
                   "qonnx_vs_ort": _agreement(q, o, tolerance)},
        quantized_activations=act, min_agreement=float(min_agreement), graph_diff=graph_diff)
    weights_ok = all(d <= rep.weight_tolerance for d in wdiff.values())
    if act:
        outputs_ok = rep.argmax_agreement >= rep.min_agreement
    else:
        outputs_ok = max(rep.torch_vs_qonnx, rep.torch_vs_ort, rep.qonnx_vs_ort) <= tolerance
    rep.passed = weights_ok and outputs_ok and not graph_diff
    return rep


def _check_settings(inputs, **limits) -> None:
    """The tolerances are numbers in their ranges, the time limit a positive number of
    seconds; the inputs a non-empty tensor."""
    for name, value in limits.items():
        lo, hi = 0.0, (1.0 if name == "min_agreement" else math.inf)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not lo <= value <= hi or math.isnan(value)):
            raise QfvError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
        if name == "time_limit" and value is not None and not 0 < value < math.inf:
            raise QfvError(f"time_limit must be a positive number of seconds or None, got "
                           f"{value!r}")
    if not isinstance(inputs, Tensor) or inputs.numel() == 0:
        raise QfvError("inputs must be a non-empty tensor (a batch the model accepts)")


def _load(source: Union[str, Path, onnx.ModelProto]):
    """The file as a model of its own (the runtimes may annotate it; a caller's proto stays
    as is) and its metadata; a file read once and checked (structure, op domains) before
    anything runs it."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model, read_metadata(model, check_graph=False)
    return read_export(source, check_graph=False)


class _RunThree:
    """:func:`_run_three` as the work of :func:`call_with_deadline`."""

    def __init__(self, *args):
        self.args = args

    def __call__(self, stopper: Stopper):
        return _run_three(*self.args, stopper=stopper)


class _Runtimes:
    """qonnx and onnxruntime over one file's graph. What they fail on is the file's doing (its
    structure passed the checks, yet it does not run): :class:`ExportFileError` naming it."""

    def __init__(self, model: onnx.ModelProto, where: str, stopper: Stopper):
        import onnxruntime as ort
        from qonnx.core.modelwrapper import ModelWrapper

        self.where, self.stopper = where, stopper
        # onnxruntime's graph optimizations fuse nodes (e.g. BatchNorm into Conv), which
        # changes float rounding before the activation quantizers; the file's semantics are
        # node by node.
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.mw = ModelWrapper(model)
            self.sess = ort.InferenceSession(to_onnxruntime(model).SerializeToString(), opts,
                                             providers=["CPUExecutionProvider"])
        except Exception as e:
            raise self._failed("onnxruntime", e) from None

    def _failed(self, runtime: str, e: Exception) -> ExportFileError:
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        return ExportFileError(f"{self.where}: {runtime} could not run the graph "
                               f"({type(e).__name__}: {shown(lines[0].strip(), 200)})")

    def qonnx(self, feed: Dict[str, np.ndarray], full: bool) -> Dict[str, np.ndarray]:
        from qonnx.core.onnx_exec import execute_onnx

        try:
            return execute_onnx(self.mw, feed, return_full_exec_context=full)
        except Exception as e:
            raise self._failed("qonnx", e) from None

    def ort(self, feed: Dict[str, np.ndarray]) -> np.ndarray:
        try:
            return self.sess.run(None, feed, self.stopper.options())[0]
        except Exception as e:
            raise self._failed("onnxruntime", e) from None


@torch.no_grad()  # in the worker thread: grad mode is per thread
def _run_three(reference: nn.Module, model: onnx.ModelProto, info: dict, inputs: Tensor,
               axis: int, where: str = "the file", stopper: Optional[Stopper] = None):
    """Outputs of torch, qonnx and onnxruntime on ``inputs`` (batch by batch along ``axis``,
    at the graph's static batch size) and the weights each layer of the file computes
    (qonnx). onnxruntime runs with ``stopper``'s options (terminated when it stops)."""
    form = form_named(info["form"])
    rt = _Runtimes(model, where, stopper or Stopper())
    iname, oname = rt.mw.graph.input[0].name, rt.mw.graph.output[0].name
    batch = rt.mw.get_tensor_shape(iname)[axis]
    if not isinstance(batch, int) or batch < 1:
        batch = inputs.shape[axis]
    t_out, q_out, o_out = [], [], []
    weights_file = None
    for part, n in _chunks(inputs.float(), batch, axis):
        t_out.append(reference(part)[:n].float().cpu().numpy())
        arr = part.cpu().numpy()
        ctx = rt.qonnx({iname: arr}, full=weights_file is None)
        if weights_file is None:
            weights_file = {r["layer"]: form.file_weight(ctx, r) for r in info["layers"]}
        q_out.append(np.asarray(ctx[oname])[:n])
        o_out.append(rt.ort({iname: arr})[:n])
    t, q, o = (np.concatenate(a) for a in (t_out, q_out, o_out))
    return t, q, o, weights_file


def _agreement(a: np.ndarray, b: np.ndarray, tolerance: float) -> float:
    """Fraction of inputs on which two runtimes agree: same top-1 class for a classifier's
    outputs, otherwise outputs within ``tolerance``."""
    if a.ndim == 2 and a.shape[1] > 1:
        return float((a.argmax(1) == b.argmax(1)).mean())
    close = np.abs(a - b).reshape(a.shape[0], -1).max(1) <= tolerance
    return float(close.mean())


def _has_activation_quant(model: onnx.ModelProto) -> bool:
    """A quantizer that depends on the graph's input (an activation, not a weight)."""
    constant = constant_tensors(model)
    return any(n.op_type in ("Quant", "BipolarQuant", "Trunc") and n.output[0] not in constant
               for n in model.graph.node)
