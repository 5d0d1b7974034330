"""``export_qonnx``: the one call that writes a quantized model to QONNX."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import onnx
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from qfv_brevitas.core.quantizers import nmult_layers
from qfv_brevitas.util.progress import RunProgress
from qfv_brevitas.util.safeio import atomic_path, check_output
from qfv_brevitas.export import fixedpoint as FX
from qfv_brevitas.export.deadline import DEFAULT_TIME_LIMIT_S
from qfv_brevitas.export.errors import ExportError, ExportVerificationError
from qfv_brevitas.export.forms import ExportForm, form_named, form_names
from qfv_brevitas.export.graph import apply_transformations, cleanup_qonnx, default_domain_first
from qfv_brevitas.export.handler import manager_for, plain_state_dict
from qfv_brevitas.export.layers import LayerExport, collect_layers, without_maps
from qfv_brevitas.export.metadata import FORMAT, format_layers, write_metadata
from qfv_brevitas.export.verify import VerifyReport, verify_qonnx
from qfv_brevitas.snn.network import snn_export_metadata, spiking_net

__all__ = ["EXPORTERS", "ExportError", "ExportVerificationError", "ExportResult", "export_qonnx",
           "reference_model", "expected_export", "on_cpu"]

EXPORTERS = ("dynamo", "torchscript")


@dataclass
class ExportResult:
    """What :func:`export_qonnx` wrote and how it checked out."""

    path: Path
    form: str
    exporter: str
    metadata: dict
    verification: Optional[VerifyReport] = None
    fixed_point: Optional[dict] = None
    reference: Optional[nn.Module] = field(default=None, repr=False)

    def summary(self) -> str:
        out = [f"wrote {self.path} ({self.form} form, {self.exporter} exporter)",
               format_layers(self.metadata)]
        out += form_named(self.form).summary(self.metadata)
        if self.fixed_point:
            fx = self.fixed_point
            if fx["frac_bits"] is None:
                grids = sorted({row["fixed_point"]["frac_bits"] for row in self.metadata["layers"]})
                out.append(f"fixed point: every layer on the grid it trained on (f = "
                           f"{', '.join(map(str, grids))}), max weight error "
                           f"{fx['max_weight_error']:.3g}")
            else:
                out.append(f"fixed point: f = {fx['frac_bits']} fractional bits, max multiplier "
                           f"error {fx['max_multiplier_error']:.3g} (bound "
                           f"{2.0 ** -(fx['frac_bits'] + 1):.3g}), "
                           f"max weight error {fx['max_weight_error']:.3g}")
            if fx.get("accuracy") is not None:
                out.append(f"  accuracy {fx['reference_accuracy']:.2f}% -> {fx['accuracy']:.2f}% "
                           f"({fx['accuracy'] - fx['reference_accuracy']:+.2f} points)")
        if self.verification is not None:
            out.append(self.verification.summary())
        return "\n".join(out)


def _check_input(example_input) -> Tensor:
    if not isinstance(example_input, Tensor):
        raise ExportError(f"example_input must be a tensor (one batch the model accepts), got "
                          f"{type(example_input).__name__}")
    if not example_input.is_floating_point() or not bool(torch.isfinite(example_input).all()):
        raise ExportError("example_input must be a finite floating-point tensor")
    return example_input.detach().float().cpu()


def _accuracy_fn(data) -> Optional[Callable[[nn.Module], float]]:
    if data is None:
        return None
    if callable(data) and not isinstance(data, Dataset):
        return data
    from qfv_brevitas.training.train import evaluate

    return lambda m: evaluate(m, data)


def on_cpu(model: nn.Module, *tensors):
    """``model`` (a CPU copy if it is elsewhere) and ``tensors`` on the CPU."""
    import copy

    p = next(model.parameters(), None)
    if p is not None and p.device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    return (model,) + tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in tensors)


def export_qonnx(model: nn.Module, example_input: Tensor, path: Union[str, Path],
                 form: str = "compact", *, frac_bits: Optional[int] = None,
                 max_accuracy_drop: Optional[float] = None, data=None, with_maps: bool = True,
                 exporter: str = "dynamo", verify: bool = True,
                 verify_inputs: Optional[Tensor] = None, extra_metadata: Optional[dict] = None,
                 overwrite: bool = False, time_limit: Optional[float] = DEFAULT_TIME_LIMIT_S,
                 progress: bool = False) -> ExportResult:
    """Write ``model`` (with N-multiplier layers) to a QONNX file in one of the registered
    forms (:mod:`qfv_brevitas.export.forms`):

    - ``"compact"``: one ``qfv_brevitas.export.ops::NMultWeight`` node per layer holding the
      uint8 codes, ``r`` and ``c`` (spec: ``docs/ops/NMultWeight.md``);
    - ``"bitplanes"``: standard ops only, ``c + sum_k r_k * Quant(B_k)`` with 1-bit planes;
    - ``"fixed"``: ``r``, ``c`` rounded to ``m * 2**-f``; one standard ``Quant`` node per layer
      (hls4ml, FINN). Give ``frac_bits``, or ``data`` (a labelled Dataset, or a function
      ``model -> accuracy in [0, 1]``) and ``max_accuracy_drop`` (points) to pick the smallest
      ``f`` that keeps the accuracy within the bound.
    - ``"planes"``: plane-parallel, for FPGAs at N bits per weight: each layer split into N
      parallel layers with 1-bit {0, 1} weights (standard ``Quant`` nodes) whose outputs are
      scaled by integer multipliers per output channel and summed, plus an all-ones layer for
      the offset, times ``2**-f``. ``r`` and ``c`` are rounded as for ``"fixed"`` (same
      ``frac_bits`` / ``data`` + ``max_accuracy_drop``), so both forms compute the same weights.

    Activations quantized by Brevitas export as standard QONNX ``Quant`` nodes. With a fault or
    variability map attached the file computes what that chip computes (``with_maps=False``:
    the ideal levels). ``exporter``: ``"dynamo"`` (torch.export) or ``"torchscript"``.
    Unless ``verify=False`` the graph is run with qonnx and onnxruntime on ``verify_inputs``
    (default: ``example_input``) against the torch model before anything is written; a failed
    check raises :class:`ExportVerificationError` and writes nothing; the run stops after
    ``time_limit`` seconds (:class:`~qfv_brevitas.export.errors.ExecutionTimeout`, None: no
    limit) or on Ctrl-C. The file is written
    atomically (:mod:`qfv_brevitas.util.safeio`); an existing one is replaced only with
    ``overwrite=True``. ``progress``: a bar over the steps (fixed point, graph, verification).

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from qfv_brevitas import NMultConfig, quantize_model
    >>> net = quantize_model(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)),
    ...                      NMultConfig(weight_bits=3, act_bits=None), torch.rand(1, 6))
    >>> out = os.path.join(tempfile.mkdtemp(), "net.onnx")
    >>> res = export_qonnx(net.eval(), torch.rand(1, 6), out, exporter="torchscript")
    >>> res.verification.passed, max(res.verification.weight_diff.values())
    (True, 0.0)
    """
    # Exported files are written from the CPU: a model trained on a GPU exports from a copy.
    model, example_input, verify_inputs = on_cpu(model, example_input, verify_inputs)
    fm = _check_settings(form, exporter, frac_bits, max_accuracy_drop, model)
    x = _check_input(example_input)
    if verify_inputs is not None:
        verify_inputs = _check_input(verify_inputs)
    _check_model(model)
    extra_metadata = dict(extra_metadata or {})
    snn = spiking_net(model)
    if snn is not None:
        x = _check_spiking(snn, x, exporter, "example_input")
        if verify_inputs is not None:
            verify_inputs = _check_spiking(snn, verify_inputs, exporter, "verify_inputs")
        extra_metadata.setdefault("snn", snn_export_metadata(model))
    check_output(path, overwrite=overwrite)  # before the work: exists? writable?
    path = Path(path)
    original, was_training = model, model.training
    model.eval()
    steps = RunProgress(2 + bool(verify), f"export {fm.name}", "step", progress, brief=True)
    try:
        proto, meta, fixed, reference = _build(model, x, fm, frac_bits, max_accuracy_drop,
                                               data, with_maps, exporter, extra_metadata,
                                               steps)
        result = ExportResult(path=path, form=fm.name, exporter=exporter, metadata=meta,
                              fixed_point=fixed, reference=reference)
        if verify:
            steps.set_phase("verify: torch vs qonnx vs onnxruntime")
            result.verification = _verified(reference, proto, path, x if verify_inputs is None
                                            else verify_inputs, time_limit)
            steps.update(1)
        steps.set_phase("write")
        _write(proto, path, overwrite)
        return result
    finally:
        steps.close()
        original.train(was_training)  # not the map-free twin of with_maps=False


def _check_settings(form: str, exporter: str, frac_bits, max_accuracy_drop,
                    model: nn.Module) -> ExportForm:
    """The form asked for, once the call's settings are checked and ``model`` has no layer
    that no form writes."""
    _refuse_embeddings(model)
    fm = form_named(form)
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if not fm.needs_fixed_point and (frac_bits is not None or max_accuracy_drop is not None):
        fixed = [f for f in form_names() if form_named(f).needs_fixed_point]
        raise ExportError(f"frac_bits / max_accuracy_drop apply to form="
                          f"{' or '.join(repr(f) for f in fixed)} only")
    return fm


def _check_model(model: nn.Module) -> None:
    """Something to export: N-multiplier layers, finite parameters."""
    if not nmult_layers(model):
        raise ExportError("the model has no N-multiplier layers: give it quantizers first "
                          "(quantize_model or swap_weight_quant)")
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ExportError(f"parameter {name} is not finite (NaN/inf): nothing sensible to "
                              "export")


def _refuse_embeddings(model: nn.Module) -> None:
    """No form writes an embedding table (a Gather on quantized rows): refuse, naming it,
    rather than export a graph that computes something else."""
    from brevitas.nn import QuantEmbedding

    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            raise ExportError(
                f"layer {name!r} is a QuantEmbedding: QONNX export of embedding tables "
                "(integer token ids in, a lookup of quantized rows) is not supported; export "
                "the layers after it as a model of their own (float inputs)")


def _verified(reference: nn.Module, proto: onnx.ModelProto, path: Path, inputs: Tensor,
              time_limit: Optional[float]) -> VerifyReport:
    """The graph run against ``reference``; raises (nothing written) if it does not match."""
    rep = verify_qonnx(reference, proto, inputs, time_limit=time_limit, where=str(path))
    if not rep.passed:
        raise ExportVerificationError(
            f"{path}: not written: the exported graph does not match the torch model "
            f"({rep.first_failure()})", rep)
    return rep


def _write(proto: onnx.ModelProto, path: Path, overwrite: bool) -> None:
    """Write the file atomically and read it back."""
    data_bytes = proto.SerializeToString()
    with atomic_path(path, overwrite=overwrite) as tmp:
        onnx.save(proto, str(tmp))
        if Path(tmp).read_bytes() != data_bytes:
            raise ExportError(f"{path}: not written: the file did not read back as exported")


def _build(model, x, form: ExportForm, frac_bits, max_accuracy_drop, data, with_maps: bool,
           exporter: str, extra_metadata, steps: Optional[RunProgress] = None):
    """The exported graph with its metadata, the fixed-point summary and the torch reference
    (``model`` in eval mode; its maps removed unless ``with_maps``)."""
    if not with_maps:
        model = without_maps(model)
    try:
        layers = collect_layers(model)
        for info in layers:  # refuse what the form cannot express before any accuracy run
            form.check_layer(info)
    except ValueError as e:
        raise ExportError(str(e)) from None
    fixed = None
    reference = model
    steps = steps or RunProgress(total=0, enabled=False)
    steps.set_phase("fixed point" if form.needs_fixed_point else "layers")
    if form.needs_fixed_point:
        fixed, reference = _fixed_point(model, layers, frac_bits, max_accuracy_drop, data,
                                        form)
    steps.update(1)
    steps.set_phase(f"graph ({exporter} exporter)")
    by_proxy = {id(m.weight_quant): info for (_, m), info in zip(nmult_layers(model), layers)}
    proto = _run_exporter(model, x, form, by_proxy, exporter)
    proto = _finish(proto, layers, form)
    meta = {"format": FORMAT, "form": form.name, "exporter": exporter,
            "version": _version(), "device": bool(with_maps),
            "input_shape": list(x.shape),
            "layers": [form.layer_metadata(info) for info in layers],
            "extra": extra_metadata}
    if fixed is not None:
        meta["fixed_point"] = {k: v for k, v in fixed.items() if k != "tried"}
    meta.update(form.metadata(layers))
    write_metadata(proto, meta)
    steps.update(1)
    return proto, meta, fixed, reference


def expected_export(model: nn.Module, info: dict) -> onnx.ModelProto:
    """The graph that exporting ``model`` with the settings recorded in a file's metadata
    ``info`` gives (form, exporter, device maps or not, fractional bits, input shape): what
    the file must equal, parameter for parameter, if it was exported from ``model``."""
    fx = info.get("fixed_point") or {}
    try:
        form = form_named(info["form"])
        x = torch.zeros([int(d) for d in info["input_shape"]])
        frac = fx.get("frac_bits") if form.needs_fixed_point else None
        was_training = model.training
        model.eval()
        try:
            proto, *_ = _build(model, x, form, frac, None, None,
                               bool(info.get("device", True)), info["exporter"], {})
        finally:
            model.train(was_training)
    except (KeyError, TypeError) as e:
        raise ExportError(f"the file's metadata lacks an export setting ({e})") from None
    return proto


def _check_spiking(net, x: Tensor, exporter: str, what: str) -> Tensor:
    """Spiking models export on spike trains: their LIF layers unroll over T steps."""
    cfg = net.config
    if exporter != "dynamo":
        raise ExportError("spiking models export with exporter='dynamo': spikingjelly's LIF "
                          "neuron is a custom torch op the TorchScript exporter cannot translate")
    if x.dim() == cfg.sample_ndim + 1 and cfg.encoding == "rate":
        raise ExportError(
            f"this spiking model rate-codes static inputs with random spikes inside its forward; "
            f"give {what} as spike trains of shape (T, N, ...) instead, e.g. "
            f"qfv_brevitas.snn.rate_encode(x, T={cfg.T}) (layout {cfg.layout!r})")
    return x


def _version() -> str:
    from qfv_brevitas.util.version import __version__

    return __version__


def _fixed_point(model, layers: Sequence[LayerExport], frac_bits, max_drop, data,
                 form: ExportForm):
    """Round every layer's multipliers to ``2**-f`` (``f`` given, or the smallest within the
    accuracy bound); returns the fixed-point summary and the fixed-point torch reference."""
    acc = _accuracy_fn(data)
    try:
        if FX.on_training_grids(layers):  # every layer trained on its grid: nothing to choose
            pick = {"frac_bits": None}
            if acc is not None:
                pick["reference_accuracy"] = 100.0 * acc(model)
        elif frac_bits is None:
            if max_drop is None or acc is None:
                raise ExportError(
                    f"form={form.name!r} needs frac_bits, or data and max_accuracy_drop to "
                    "choose the smallest fractional width within that accuracy drop")
            pick = FX.choose_frac_bits(model, layers, acc, max_drop)
        else:
            for info in layers:
                FX.fixed_point_layer(info, frac_bits)
            pick = {"frac_bits": int(frac_bits)}
            if acc is not None:
                pick["reference_accuracy"] = 100.0 * acc(model)
    except ExportError:
        raise
    except ValueError as e:
        raise ExportError(str(e)) from None
    reference = FX.fixed_point_model(model, layers)
    if acc is not None and "accuracy" not in pick:
        pick["accuracy"] = 100.0 * acc(reference)
    rows = [info.fixed_point for info in layers]
    pick.update(max_multiplier_error=max(r.max_multiplier_error for r in rows),
                max_weight_error=max(r.max_weight_error for r in rows),
                layers={info.name: {"int_bits": info.fixed_point.int_bits,
                                    "signed": info.fixed_point.signed,
                                    "max_weight_error": info.fixed_point.max_weight_error}
                        for info in layers})
    pick.setdefault("accuracy", None)
    pick.setdefault("reference_accuracy", None)
    for info in layers:
        form.finish_layer(info, info.fixed_point.frac_bits)
    return pick, reference


def _run_exporter(model, x, form: ExportForm, by_proxy, exporter) -> onnx.ModelProto:
    dynamo = exporter == "dynamo"
    manager = manager_for(form.handler, by_proxy, dynamo)
    kwargs = dict(dynamo=True, optimize=True) if dynamo else dict(dynamo=False)
    with warnings.catch_warnings(), plain_state_dict():
        warnings.simplefilter("ignore")
        try:
            if dynamo:
                with _quiet():
                    return manager.export(model, args=x, **kwargs)
            return manager.export(model, args=x, **kwargs)
        except Exception as e:  # the exporters' own errors are long; say which one failed
            raise ExportError(f"the {exporter} exporter failed on this model: "
                              f"{type(e).__name__}: {e}" + (
                                  "\n(try exporter='torchscript')" if dynamo else
                                  "\n(try exporter='dynamo')")) from e


@contextlib.contextmanager
def _quiet():
    """torch.onnx's dynamo exporter prints progress lines to stdout and logs a warning per
    torchvision op it cannot register (torchvision is optional here); keep both out of ours."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _finish(proto: onnx.ModelProto, layers: Sequence[LayerExport], form: ExportForm
            ) -> onnx.ModelProto:
    """The form's graph rewrites (each layer's weight tensor named ``<layer>.weight``, ...),
    then a cleanup that does not fold the weight quantizers."""
    default_domain_first(proto)
    try:
        proto = apply_transformations(proto, form.transformations(layers))
    except ValueError as e:
        raise ExportError(str(e)) from None
    return cleanup_qonnx(proto)


def reference_model(model: nn.Module, source, where: Optional[str] = None) -> nn.Module:
    """The torch model a file exported from ``model`` must agree with: ``model`` itself, with
    its maps removed if the file holds the ideal levels, with the fixed-point multipliers for
    the fixed-point form. Raises if the file's layers do not match ``model``'s. ``source``: a
    path (read and checked as :func:`~qfv_brevitas.export.metadata.read_export` does) or a
    model, named ``where`` in messages."""
    from qfv_brevitas.export.metadata import read_metadata

    if where is None:
        where = "the file" if isinstance(source, onnx.ModelProto) else str(source)
    info = read_metadata(source, check_graph=False, where=where)  # verify_qonnx: the graph
    twin = model.eval() if info.get("device", True) else without_maps(model)
    layers = collect_layers(twin)
    have = {i.name: i for i in layers}

    def mismatch(msg: str) -> ExportVerificationError:
        return ExportVerificationError(f"{where} does not match the model: {msg}")

    extra = sorted(set(have) - {row["layer"] for row in info["layers"]})
    if extra:
        raise mismatch(f"the model has N-multiplier layers {extra} that the file does not: not "
                       "the model that was exported")
    for row in info["layers"]:
        mine = have.get(row["layer"])
        if mine is None:
            raise mismatch(f"layer {row['layer']!r} of the file is not an N-multiplier layer of "
                           f"the model (its layers: {sorted(have)}): not the model that was "
                           "exported")
        if mine.bits != row["bits"]:
            raise mismatch(f"layer {row['layer']!r}: {row['bits']}-bit weights in the file but "
                           f"{mine.bits}-bit in the model: exported from another checkpoint")
        if list(mine.weight_shape) != row["weight_shape"]:
            raise mismatch(f"layer {row['layer']!r}: weight shape {row['weight_shape']} in the "
                           f"file but {list(mine.weight_shape)} in the model: exported from "
                           "another checkpoint")
    for row in info["layers"]:
        mine = have[row["layer"]]
        if mine.r.tolist() != row["r"] or mine.c.tolist() != row["c"]:
            raise mismatch(f"layer {row['layer']!r}: the model's multipliers differ from the "
                           "file's r, c (another checkpoint of this architecture, or the model "
                           "was trained further after the export)")
    if not form_named(info["form"]).needs_fixed_point:
        return twin
    f = info["fixed_point"]["frac_bits"]
    for i in layers:
        FX.fixed_point_layer(i, f)
    return FX.fixed_point_model(twin, layers)
