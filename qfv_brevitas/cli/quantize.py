"""``qfv quantize``: post-training quantization of a trained float model to fitted levels."""
from __future__ import annotations

import json
from pathlib import Path

from qfv_brevitas.cli.common import add_dataset_args, command, declare_io

__all__ = ["run_quantize", "default_out"]


@command("quantize", help="post-training quantization: a trained float model's weights to "
                          "N-bit levels fitted to them (no training)")
def quantize(p):
    from qfv_brevitas.zoo.models import MODEL_NAMES

    p.add_argument("checkpoint", help="a qfv checkpoint (float, or quantized: its float weights "
                                      "are used) or a torch.save-d state dict (with --arch)")
    p.add_argument("--bits", type=int, required=True, help="weight bits N of the inner layers")
    p.add_argument("--per-channel", action="store_true", help="one (r, c) per output channel")
    p.add_argument("--first-last-bits", default="8",
                   help="weight bits of the first and last layers (default 8; 'same' = --bits)")
    p.add_argument("--out", help="checkpoint to write (default: next to CHECKPOINT, "
                                 "<name>_nmult_w<N>[_pc].pt); a <out>_levels.png and "
                                 "<out>.json are written beside it")
    p.add_argument("--arch", choices=MODEL_NAMES,
                   help="architecture of a plain state dict (qfv checkpoints carry theirs)")
    add_dataset_args(p, help="test data for the accuracy before/after (and the input shape "
                             "of a plain state dict)")
    p.add_argument("--seed", type=int, default=0,
                   help="data split seed for a plain state dict (checkpoints carry theirs)")
    p.add_argument("--baseline", choices=("max", "mse", "none"), default="max",
                   help="also evaluate Brevitas' uniform weight quantizer at the same bits: "
                        "max (its default statistics), mse, or none")
    p.add_argument("--no-eval", action="store_true", help="no accuracy (no data needed)")
    p.add_argument("--no-lloyd", action="store_true", help="skip the Lloyd-Max reference")
    p.add_argument("--no-plot", action="store_true", help="no levels figure")
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
    from qfv_brevitas.zoo.data import load_dataset
    from qfv_brevitas.zoo.models import build_model
    from qfv_brevitas.studies.ptq import PTQError, quantize_post_training, read_model_file
    from qfv_brevitas.util.safeio import atomic_write, check_output

    bits = L.check_bits(args.bits, "--bits")
    flb = None if args.first_last_bits == "same" else _int_bits(args.first_last_bits)
    src = Path(args.checkpoint)
    outputs = _outputs(args)
    inputs = [x for x in (args.checkpoint, args.data_dir) if x]
    for path in outputs[1:]:  # the checkpoint itself was checked with the declared output
        check_output(path, overwrite=args.force, inputs=inputs)
    if len({Path(p).resolve() for p in outputs}) != len(outputs):
        raise PTQError(f"--out {args.out}: its summary or figure would overwrite it; give a "
                       "name ending in .pt")
    if args.dataset == "idx" and not args.data_dir:
        raise ValueError("--dataset idx needs --data-dir DIR (a folder with the IDX files)")
    kind, obj = read_model_file(src)
    if kind == "checkpoint":
        model, info = obj
        arch, shape, classes = info["arch"], tuple(info["input_shape"]), info["num_classes"]
        meta = dict(info.get("meta") or {})
        data_seed = int(meta.get("data_seed", 0))
        source_kind = "float" if info["config"] is None else "quantized (float weights used)"
    else:
        if args.arch is None:
            raise PTQError(f"{src}: not a qfv checkpoint; a plain state dict needs --arch "
                           "(the architecture it belongs to)")
        data_seed, meta, arch, source_kind = args.seed, {}, args.arch, "state dict"
        shape, classes = None, None
    test = None
    if not args.no_eval or shape is None:
        _, test, n_cls, d_shape = load_dataset(args.dataset, args.data_dir, data_seed)
        if shape is not None and (tuple(d_shape) != shape or n_cls != classes):
            raise ValueError(f"{src} was trained on inputs {shape} with {classes} classes, but "
                             f"--dataset {args.dataset} has {tuple(d_shape)} and {n_cls}")
        if shape is None:
            shape, classes = tuple(d_shape), n_cls
    if args.no_eval:
        test = None
    if kind == "state":
        model = build_model(arch, shape, classes)
        source = obj
    else:
        source, model = model, None
    res = quantize_post_training(source, bits, args.per_channel, model=model,
                                 first_last_bits=flb, data=test, lloyd=not args.no_lloyd,
                                 baseline=None if args.baseline == "none" else args.baseline,
                                 example_input=None if test is not None
                                 else torch.zeros(2, *shape))
    out = outputs[0]
    print(f"{src} ({source_kind}, {arch}) -> {bits}-bit fitted N-multiplier weights"
          f"{' per channel' if args.per_channel else ''}, float activations")
    print(res.table())
    meta.update({"acc": res.acc, "dataset": args.dataset, "data_seed": data_seed,
                 "ptq": {"source": str(src), "float_acc": res.float_acc,
                         "baseline": res.baseline, "baseline_acc": res.baseline_acc}})
    # The figure and the summary first, the checkpoint last: a checkpoint on disk means the
    # run finished (each file is written atomically).
    if not args.no_plot:
        res.plot(outputs[2], overwrite=args.force)
    atomic_write(outputs[1], json.dumps({"source": str(src), "arch": arch, **res.to_dict()},
                                        indent=2), overwrite=args.force, inputs=inputs)
    save_checkpoint(out, res.model, arch, shape, classes, res.config, overwrite=args.force,
                    **meta)
    print("\nwrote " + ", ".join(str(p) for p in outputs))
    return 0


def _int_bits(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--first-last-bits must be an integer in 1..8 or 'same', got "
                         f"{text!r}") from None
