"""``qfv export | inspect | verify | crossbar``: QONNX files and crossbar mappings."""
from __future__ import annotations

import json
import sys

from qfv_brevitas.cli.common import (add_dataset_args, command, declare_io, integer,
                                     load_for_device, note, require_quantized, show)
from qfv_brevitas.util.errors import QfvError

__all__ = ["run_export", "run_inspect", "run_verify", "run_crossbar"]


def _data_args(p):
    add_dataset_args(p, help="the data the checkpoint was trained on (for inputs and accuracy)")
    _allow_import(p)
    p.add_argument("--samples", type=integer, default=64,
                   help="test images the file is verified on (default 64)")
    p.add_argument("--time-limit", type=float, default=600.0, metavar="SECONDS",
                   help="stop running the graph after this many seconds (exit 4; default 600)")


def _time_limit(args) -> float:
    """``--time-limit``: a positive, finite number of seconds."""
    import math

    if not 0 < args.time_limit < math.inf:
        raise QfvError(f"--time-limit must be a positive number of seconds, got "
                       f"{args.time_limit}")
    return args.time_limit


@command("export", help="write a checkpoint to QONNX (compact / bit planes / fixed point / "
                        "plane-parallel), verified against torch")
def export(p):
    from qfv_brevitas.export import EXPORTERS
    from qfv_brevitas.export.forms import form_named, form_names

    p.add_argument("checkpoint", help="a quantized model saved by qfv train/demo/finetune")
    p.add_argument("--form", choices=form_names(), default="compact",
                   help="; ".join(f"{f}: {form_named(f).help}" for f in form_names()))
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--frac-bits", type=integer,
                   help="fixed and planes forms: fractional bits f of r and c")
    p.add_argument("--max-acc-drop", type=float,
                   help="fixed and planes forms: pick the smallest f whose test accuracy drop "
                        "stays within this many points")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="torch's ONNX exporter: dynamo (torch.export) or torchscript")
    p.add_argument("--ideal", action="store_true",
                   help="export the ideal levels even if the checkpoint carries a fault or "
                        "variability map (default: what that device computes)")
    p.add_argument("--batch-size", type=integer, default=1,
                   help="the graph's (static) batch size")
    p.add_argument("--no-verify", action="store_true",
                   help="do not run the file against the torch model before writing it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also -q)")
    _data_args(p)
    declare_io(p, "file", inputs=("checkpoint", "data_dir"))
    return run_export


@command("inspect", help="the per-layer bits, r, c and device summary of a file written by "
                         "qfv export")
def inspect(p):
    p.add_argument("file", help="a .onnx file written by qfv export")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    declare_io(p, None, inputs=("file",))
    return run_inspect


@command("verify", help="run an exported file with torch, qonnx and onnxruntime and compare")
def verify(p):
    p.add_argument("file", help="a .onnx file written by qfv export")
    p.add_argument("checkpoint", help="the checkpoint the file was exported from")
    p.add_argument("--tolerance", type=float, help="max output difference (default: see "
                                                   "README)")
    p.add_argument("--min-agreement", type=float,
                   help="quantized activations: least top-1 agreement of each pair of runtimes "
                        "(default 0.98)")
    _data_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also -q)")
    declare_io(p, None, inputs=("file", "checkpoint", "data_dir"))
    return run_verify


@command("crossbar", help="per-layer bit-plane matrices and multipliers for an accelerator "
                          "(npz + manifest.json)")
def crossbar(p):
    p.add_argument("checkpoint", help="a quantized model saved by qfv train/demo/finetune")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--ideal", action="store_true", help="ideal codes, ignoring attached maps")
    _allow_import(p)
    declare_io(p, "crossbar")
    return run_crossbar


def _allow_import(p) -> None:
    """``--allow-import`` (see :mod:`qfv_brevitas.cli.usercode`)."""
    from qfv_brevitas.cli.usercode import add_allow_import

    add_allow_import(p)


def _model_and_data(args):
    if args.samples < 1:
        raise QfvError(f"--samples must be at least 1, got {args.samples}")
    model, info, train, test = load_for_device(args)
    n = min(args.samples, len(test))
    inputs = test.tensors[0][:n]
    return model, info, test, inputs


def run_export(args) -> int:
    from qfv_brevitas.export import export_qonnx
    from qfv_brevitas.export import ExportVerificationError
    from qfv_brevitas.export.forms import form_named, form_names

    if args.batch_size < 1:
        raise QfvError(f"--batch-size must be at least 1, got {args.batch_size}")
    time_limit = _time_limit(args)
    fixed_point = form_named(args.form).needs_fixed_point
    if not fixed_point and (args.frac_bits is not None or args.max_acc_drop is not None):
        fixed = [f for f in form_names() if form_named(f).needs_fixed_point]
        raise QfvError(f"--frac-bits / --max-acc-drop apply to --form {' or '.join(fixed)} "
                       "only")
    if args.max_acc_drop is not None and not args.max_acc_drop >= 0:
        raise QfvError(f"--max-acc-drop must be >= 0 points, got {args.max_acc_drop}")
    if args.max_acc_drop is not None and not args.max_acc_drop <= 100:
        raise QfvError(f"--max-acc-drop must be at most 100 points (all of the accuracy), got "
                       f"{args.max_acc_drop}")
    model, info, test, inputs = _model_and_data(args)
    example = test.tensors[0][:args.batch_size]
    example, inputs = _spike_trains(model, example), _spike_trains(model, inputs)
    data = test if fixed_point and (args.max_acc_drop is not None
                                    or args.frac_bits is not None) else None
    try:
        res = export_qonnx(model, example, args.out, args.form, frac_bits=args.frac_bits,
                           max_accuracy_drop=args.max_acc_drop, data=data,
                           with_maps=not args.ideal, exporter=args.exporter,
                           verify=not args.no_verify, verify_inputs=inputs,
                           extra_metadata={"checkpoint": str(args.checkpoint),
                                           "arch": info["arch"]}, overwrite=args.force,
                           time_limit=time_limit, progress=not args.no_progress)
    except ExportVerificationError as e:
        if e.report is not None:
            show(e.report.summary())
        raise
    show(res.summary())
    return 0


def _spike_trains(model, x):
    """A rate-coding spiking model exports on spike trains: encode the test images the way its
    evaluation does (its fixed evaluation seed), so the file sees the same spikes."""
    from qfv_brevitas.snn.network import spiking_net

    net = spiking_net(model)
    if net is None or net.config.encoding != "rate" or x.dim() != net.config.sample_ndim + 1:
        return x
    import torch

    from qfv_brevitas.snn import rate_encode

    seq = rate_encode(x, net.config.T,
                      generator=torch.Generator().manual_seed(net.config.eval_seed))
    return seq if net.config.layout == "time_first" else seq.transpose(0, 1)


def run_inspect(args) -> int:
    from qfv_brevitas.export import format_layers, read_metadata

    info = read_metadata(args.file)
    show(json.dumps(info, indent=1) if args.json else format_layers(info))
    return 0


def run_verify(args) -> int:
    from qfv_brevitas.export import reference_model, verify_qonnx
    from qfv_brevitas.util.progress import RunProgress
    from qfv_brevitas.export.api import expected_export
    from qfv_brevitas.export.metadata import read_export

    for name, v, hi in (("--tolerance", args.tolerance, float("inf")),
                        ("--min-agreement", args.min_agreement, 1.0)):
        if v is not None and not 0.0 <= v <= hi:
            raise QfvError(f"{name} must be in [0, {hi:g}], got {v}")
    time_limit = _time_limit(args)
    with RunProgress(3, "verify", "step", not args.no_progress, brief=True) as bar:
        bar.set_phase("read the file and the checkpoint")
        # The file is read once, its metadata and structure checked before any other work.
        graph, meta = read_export(args.file, check_graph=False)
        model, info, test, inputs = _model_and_data(args)
        inputs = _spike_trains(model, inputs)
        reference = reference_model(model, graph, where=args.file)
        bar.update(1)
        bar.set_phase("export the checkpoint with the file's settings")
        # The file must be exactly what this checkpoint exports with the file's settings:
        # every parameter of the graph (weights, biases, activation scales, zero points).
        expected = expected_export(model, meta)
        bar.update(1)
        bar.set_phase("run torch, qonnx and onnxruntime")
        rep = verify_qonnx(reference, graph, inputs, tolerance=args.tolerance,
                           min_agreement=args.min_agreement, expected=expected,
                           time_limit=time_limit, where=args.file)
        bar.update(1)
    show(rep.summary())
    if not rep.passed:
        show(f"qfv verify: {args.file} does not match {args.checkpoint}: "
              f"{rep.first_failure()}", file=sys.stderr)
    return 0 if rep.passed else 1


def run_crossbar(args) -> int:
    from qfv_brevitas.cli.usercode import import_permission
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.export import write_crossbar

    model, info = load_checkpoint(args.checkpoint, import_permission(args))
    require_quantized(args, info)
    manifest = write_crossbar(model, args.out, with_maps=not args.ideal, overwrite=args.force,
                              inputs=[args.checkpoint])
    data = json.loads(manifest.read_text())
    for row in data["layers"]:
        show(f"  {row['layer']}: {row['bits']} planes of {row['matrix_shape'][0]}x"
              f"{row['matrix_shape'][1]} -> {row['file']}")
    note(f"wrote {manifest}")
    return 0
