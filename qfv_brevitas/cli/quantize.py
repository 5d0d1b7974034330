"""``qfv quantize``: post-training quantization of a trained float model to fitted levels."""
from __future__ import annotations

import json
from pathlib import Path

from qfv_brevitas.cli.common import add_dataset_args, command, declare_io, integer, note, seed, show
from qfv_brevitas.util.errors import QfvError

__all__ = ["run_quantize", "default_out"]


@command("quantize", help="post-training quantization: a trained float model's weights to "
                          "N-bit levels fitted to them (no training)")
def quantize(p):
    from qfv_brevitas.cli.usercode import LateChoices, add_allow_import, model_arg, model_names

    p.add_argument("checkpoint", help="a qfv checkpoint (float, or quantized: its float weights "
                                      "are used) or a torch.save-d state dict (with --model)")
    p.add_argument("--bits", type=integer, required=True, help="weight bits N of the inner layers")
    p.add_argument("--per-channel", action="store_true", help="one (r, c) per output channel")
    p.add_argument("--first-last-bits", default="8",
                   help="weight bits of the first and last layers (default 8; 'same' = --bits)")
    p.add_argument("--out", help="checkpoint to write (default: next to CHECKPOINT, "
                                 "<name>_nmult_w<N>[_pc].pt); a <out>_levels.png and "
                                 "<out>.json are written beside it")
    p.add_argument("--model", dest="arch", type=model_arg, action=LateChoices,
                   names=model_names, specs=True, metavar="NAME|MODULE:FUNCTION",
                   help="architecture of a plain state dict (qfv checkpoints carry theirs): a "
                        "built-in or plugin model name, or module:function (your own)")
    add_allow_import(p)
    add_dataset_args(p, help="test data for the accuracy before/after (and the input shape "
                             "of a plain state dict)")
    p.add_argument("--seed", type=seed, default=0,
                   help="data split seed for a plain state dict (checkpoints carry theirs)")
    p.add_argument("--act-bits", type=integer, default=None, metavar="A",
                   help="quantize the inner layers' input activations at A bits (1..8) with "
                        "Brevitas' activation quantizers, calibrated on the training split "
                        "(first/last layers at --first-last-bits); default: float activations")
    p.add_argument("--compensation", choices=("gptq", "gpfq", "none"), default="gptq",
                   help="error compensation with Brevitas' GPTQ (default) or GPFQ over the "
                        "calibration samples, for the N-multiplier levels and the baseline "
                        "alike; none: plain nearest-level snapping")
    p.add_argument("--bias-correction", action="store_true",
                   help="Brevitas' bias correction after the other steps (both models)")
    p.add_argument("--calib-samples", type=integer, default=256,
                   help="training samples for calibration and compensation (default 256)")
    p.add_argument("--baseline", choices=("mse", "max", "none"), default="mse",
                   help="also evaluate Brevitas' uniform weight quantizer at the same bits, "
                        "with the same activations and toolbox steps: mse (its MSE scale, the "
                        "default), max (max-abs statistics), or none")
    p.add_argument("--no-eval", action="store_true", help="no accuracy (no data needed)")
    p.add_argument("--no-lloyd", action="store_true", help="skip the Lloyd-Max reference")
    p.add_argument("--no-plot", action="store_true", help="no levels figure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also -q)")
    declare_io(p, "file", inputs=("checkpoint", "data_dir"))
    p.set_defaults(_io_default_out=default_out)
    return run_quantize


def default_out(args) -> str:
    """``--out`` when not given: ``<checkpoint>_nmult_w<N>[_pc].pt`` beside the checkpoint."""
    src = Path(args.checkpoint)
    return str(src.with_name(f"{src.stem}_nmult_w{args.bits}"
                             f"{'_pc' if args.per_channel else ''}.pt"))


def _outputs(args):
    """The checkpoint, its JSON summary and (unless --no-plot) the levels figure."""
    out = Path(args.out)
    paths = [out, out.with_suffix(".json")]
    if not args.no_plot:
        paths.append(out.with_name(f"{out.stem}_levels.png"))
    return paths


def run_quantize(args) -> int:
    import torch

    from qfv_brevitas.core import levels as L
    from qfv_brevitas.zoo.checkpoint import save_checkpoint
    from qfv_brevitas.studies.ptq import PTQError, quantize_post_training
    from qfv_brevitas.util.safeio import atomic_write, check_output

    bits = L.check_bits(args.bits, "--bits")
    flb = None if args.first_last_bits == "same" else _int_bits(args.first_last_bits)
    act_bits = None if args.act_bits is None else L.check_bits(args.act_bits, "--act-bits")
    compensation = None if args.compensation == "none" else args.compensation
    src = Path(args.checkpoint)
    outputs = _outputs(args)
    inputs = [x for x in (args.checkpoint, args.data_dir) if x]
    for path in outputs[1:]:  # the checkpoint itself was checked with the declared output
        check_output(path, overwrite=args.force, inputs=inputs)
    if len({Path(p).resolve() for p in outputs}) != len(outputs):
        raise PTQError(f"--out {args.out}: its summary or figure would overwrite it; give a "
                       "name ending in .pt")
    if args.dataset == "idx" and not args.data_dir:
        raise QfvError("--dataset idx needs --data-dir DIR (a folder with the IDX files)")
    calibrated = act_bits is not None or compensation is not None or args.bias_correction
    src_info = _read_source(args, src, need_data=calibrated or not args.no_eval)
    res = quantize_post_training(
        src_info["source"], bits, args.per_channel, model=src_info["model"],
        first_last_bits=flb, data=None if args.no_eval else src_info["test"],
        lloyd=not args.no_lloyd, baseline=None if args.baseline == "none" else args.baseline,
        example_input=None if calibrated or not args.no_eval
        else torch.zeros(2, *src_info["shape"]), act_bits=act_bits,
        calib_data=src_info["train"] if calibrated else None,
        calib_samples=args.calib_samples, compensation=compensation,
        bias_correction=args.bias_correction, progress=not args.no_progress)
    _write_outputs(args, src, src_info, res, outputs, inputs, save_checkpoint, atomic_write)
    return 0


def _read_source(args, src: Path, need_data: bool) -> dict:
    """The model file and, where needed, the data: ``source``/``model`` for
    :func:`quantize_post_training`, ``arch``, ``shape``, ``classes``, ``meta``, ``data_seed``,
    ``kind`` (words), ``train``/``test`` splits (``None`` when not needed)."""
    from qfv_brevitas.studies.ptq import PTQError, read_model_file
    from qfv_brevitas.zoo.data import load_dataset
    from qfv_brevitas.zoo.models import build_model

    from qfv_brevitas.cli.usercode import import_permission

    kind, obj = read_model_file(src, import_permission(args))
    if kind == "checkpoint":
        model, info = obj
        out = {"arch": info["arch"], "shape": tuple(info["input_shape"]),
               "classes": info["num_classes"], "meta": dict(info.get("meta") or {})}
        out["data_seed"] = int(out["meta"].get("data_seed", 0))
        out["kind"] = "float" if info["config"] is None else "quantized (float weights used)"
    else:
        if args.arch is None:
            raise PTQError(f"{src}: not a qfv checkpoint; a plain state dict needs --model "
                           "(the architecture it belongs to)")
        out = {"arch": args.arch, "shape": None, "classes": None, "meta": {},
               "data_seed": args.seed, "kind": "state dict"}
    out["train"] = out["test"] = None
    if need_data or out["shape"] is None:
        train, test, n_cls, d_shape = load_dataset(args.dataset, args.data_dir,
                                                   out["data_seed"])
        if out["shape"] is not None and (tuple(d_shape) != out["shape"]
                                         or n_cls != out["classes"]):
            raise QfvError(f"{src} was trained on inputs {out['shape']} with "
                           f"{out['classes']} classes, but --dataset {args.dataset} has "
                           f"{tuple(d_shape)} and {n_cls}")
        out.update(train=train, test=test, shape=tuple(d_shape), classes=n_cls)
    if kind == "state":
        out["source"], out["model"] = obj, build_model(out["arch"], out["shape"],
                                                        out["classes"])
    else:
        out["source"], out["model"] = model, None
    return out


def _write_outputs(args, src: Path, info: dict, res, outputs, inputs, save_checkpoint,
                   atomic_write) -> None:
    """Print the table; write the figure, the JSON summary and the checkpoint (last)."""
    acts = (f"{res.config.act_bits}-bit activations (Brevitas, calibrated)"
            if res.config.act_bits is not None else "float activations")
    steps = ([res.meta["compensation"].upper()] if res.meta.get("compensation") else []) + \
        (["bias correction"] if res.meta.get("bias_correction") else [])
    show(f"{src} ({info['kind']}, {info['arch']}) -> {res.config.weight_bits}-bit fitted "
          f"N-multiplier weights{' per channel' if args.per_channel else ''}, {acts}"
          + (f"; {', '.join(steps)} on {res.meta['calib_samples']} training samples"
             if steps else ""))
    show(res.table())
    meta = info["meta"]
    meta.update({"acc": res.acc, "dataset": args.dataset, "data_seed": info["data_seed"],
                 "ptq": {"source": str(src), "float_acc": res.float_acc,
                         "baseline": res.baseline, "baseline_acc": res.baseline_acc,
                         **res.meta}})
    # The figure and the summary first, the checkpoint last: a checkpoint on disk means the
    # run finished (each file is written atomically).
    if not args.no_plot:
        res.plot(outputs[2], overwrite=args.force)
    atomic_write(outputs[1], json.dumps({"source": str(src), "arch": info["arch"],
                                         **res.to_dict()}, indent=2),
                 overwrite=args.force, inputs=inputs)
    save_checkpoint(outputs[0], res.model, info["arch"], info["shape"], info["classes"],
                    res.config, overwrite=args.force, **meta)
    note("\nwrote " + ", ".join(str(p) for p in outputs))


def _int_bits(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise QfvError(f"--first-last-bits must be an integer in 1..8 or 'same', got "
                       f"{text!r}") from None
