"""``qfv lm``: a small language model on real text (the running Python's standard-library
sources, byte level), quantized, fine-tuned and put on a chip; scores in bits per byte.

* ``qfv lm train``: train the project's small transformer, save a checkpoint.
* ``qfv lm ptq CHECKPOINT``: fitted N-multiplier levels against Brevitas' uniform MSE-scale
  weight PTQ (optionally both with Brevitas' GPTQ) at each ``--bits``.
* ``qfv lm qat CHECKPOINT``: a short QAT fine-tune per method (paper, STE, stock Brevitas).
* ``qfv lm chip CHECKPOINT``: stuck bits and variability Monte Carlo on the fitted model, and
  the fault-aware repair of one map.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qfv_brevitas.cli.common import command, command_group, declare_io, integer, note, seed, show
from qfv_brevitas.util.errors import QfvError

__all__ = ["run_train", "run_ptq", "run_qat", "run_chip"]

command_group("lm", help="a small language model on real text: train, PTQ, QAT, chip")


def _val_bytes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-bytes", type=integer, default=1 << 17,
                   help="validation bytes scored (from the start of the validation files)")


def _common(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    p.add_argument("--steps", type=integer, default=steps, help="optimizer steps (batch 32)")
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (cosine decay)")
    _val_bytes(p)
    p.add_argument("--seed", type=seed, default=0,
                   help="the run's seed: initial weights, training windows and their order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also -q)")


def _checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a float language model written by qfv lm train")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON here")


@command("lm", "train", help="train the small transformer on the standard library's sources",
         description="Trains the project's small decoder-only transformer (TinyLM) on "
                     "next-byte prediction over the running Python's standard-library .py "
                     "files (split by file into training and validation text) and writes a "
                     "float checkpoint for qfv lm ptq / qat / chip.")
def train(p: argparse.ArgumentParser):
    _common(p, 2000, 4e-3)
    p.add_argument("--context", type=integer, default=64, help="bytes per training window")
    p.add_argument("--out", default="lm.pt", help="the checkpoint written")
    declare_io(p, "file", inputs=())
    return run_train


@command("lm", "ptq", help="post-training quantization of a language model, in bits per byte",
         description="Quantizes the checkpoint's weights after training at each --bits, per "
                     "output channel (embedding and LM head at 8 bits): fitted N-multiplier "
                     "levels against Brevitas' uniform MSE-scale quantizer, plain and, with "
                     "--compensation gptq, both with Brevitas' GPTQ.")
def ptq(p: argparse.ArgumentParser):
    _checkpoint(p)
    p.add_argument("--bits", type=integer, nargs="+", default=[4, 3, 2],
                   help="weight bits of the attention and MLP projections")
    p.add_argument("--compensation", choices=("none", "gptq"), nargs="+",
                   default=["none", "gptq"], help="error compensation(s) compared")
    p.add_argument("--per-tensor", action="store_true", help="one (r, c) per layer")
    p.add_argument("--calib-samples", type=integer, default=128,
                   help="training windows that drive GPTQ")
    _val_bytes(p)
    declare_io(p, None)
    return run_ptq


@command("lm", "qat", help="short quantization-aware fine-tunes of a language model",
         description="Fine-tunes the checkpoint quantized at --bits with each --methods for "
                     "the same steps, data order and optimizer (AdamW): the regularizer in "
                     "paper mode, in STE mode, and stock Brevitas QAT (uniform per-channel "
                     "weights, plain STE); prints validation bits per byte.")
def qat(p: argparse.ArgumentParser):
    from qfv_brevitas.studies.lm import QAT_METHODS

    _checkpoint(p)
    _common(p, 300, 1e-3)
    p.add_argument("--bits", type=integer, nargs="+", default=[3], help="weight bits")
    p.add_argument("--methods", nargs="+", choices=QAT_METHODS, default=list(QAT_METHODS),
                   help="paper (regularizer, levels at evaluation), both (regularizer and levels "
                        "in the forward, STE), ste (levels, STE, no regularizer), brevitas "
                        "(stock uniform QAT)")
    declare_io(p, None)
    return run_qat


@command("lm", "chip", help="a quantized language model on an imperfect chip",
         description="Quantizes the checkpoint (fitted levels at --bits, per channel) and runs "
                     "Monte Carlo over stuck-at maps (--stuck) and variability maps (--sigma) "
                     "on the inner layers, naive and nearest-valid-level deployment; with "
                     "--repair-rate, the fault-aware fine-tune of one map.")
def chip(p: argparse.ArgumentParser):
    _checkpoint(p)
    _common(p, 100, 3e-4)
    p.add_argument("--bits", type=integer, default=4, help="weight bits")
    p.add_argument("--stuck", type=float, nargs="*", default=[0.0, 0.005, 0.01, 0.02],
                   help="stuck-bit fractions")
    p.add_argument("--sigma", type=float, nargs="*", default=[0.0, 0.1, 0.2],
                   help="variability sigmas (LRS relative spread)")
    p.add_argument("--mapping", choices=("naive", "aware"), nargs="+",
                   default=["naive", "aware"], help="how codes are programmed")
    p.add_argument("--trials", type=integer, default=5, help="maps per level")
    p.add_argument("--repair-rate", type=float, default=None,
                   help="stuck-bit fraction of the one chip repaired by fault-aware "
                        "fine-tuning (--steps, --lr); none: no repair")
    declare_io(p, None)
    return run_chip


def _load(args: argparse.Namespace, train_windows: int = 256):
    """The checkpoint's float model and the corpus at its context."""
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import load_stdlib_text

    if getattr(args, "workers", 1) > 1 or getattr(args, "distributed", False):
        raise QfvError("qfv lm chip draws its maps in one process: leave out --workers and "
                       "--distributed")
    model, info = load_checkpoint(args.checkpoint)
    if args.device:
        model = model.to(args.device)
    if info["arch"] != "tiny_lm" or info["config"] is not None:
        raise QfvError(f"{args.checkpoint}: holds a {'quantized ' if info['config'] else ''}"
                       f"{info['arch']} model; qfv lm takes a float language model written by "
                       "qfv lm train")
    context = int(info["input_shape"][0])
    train, val, fp = load_stdlib_text(context, train_windows, val_bytes=args.val_bytes,
                                      seed=getattr(args, "seed", 0) + 1)
    trained_on = (info.get("meta") or {}).get("corpus")
    if trained_on and trained_on != fp:
        note(f"note: {args.checkpoint} was trained on another standard library's text "
             f"(corpus {trained_on[:12]}, this Python's is {fp[:12]})")
    return model.eval(), train, val


def _write_json(args: argparse.Namespace, results) -> None:
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
        note(f"wrote {args.json_out}")


def run_train(args: argparse.Namespace) -> int:
    import torch

    from qfv_brevitas.studies.lm import LMRecipe, train_lm
    from qfv_brevitas.training.lm import evaluate_bpb
    from qfv_brevitas.zoo.checkpoint import save_checkpoint
    from qfv_brevitas.zoo.data import load_stdlib_text
    from qfv_brevitas.zoo.lm import TinyLM

    train, val, fp = load_stdlib_text(args.context, 32 * args.steps,
                                      val_bytes=args.val_bytes, seed=args.seed)
    torch.manual_seed(args.seed)
    model = TinyLM(context=args.context).to(args.device or "cpu")  # as build_model rebuilds
    train_lm(model, train, val, LMRecipe(epochs=1, lr=args.lr, seed=args.seed),
             progress=not args.no_progress)
    bpb = evaluate_bpb(model, val)
    show(f"validation: {bpb:.4f} bits/byte ({len(val) * args.context} bytes; the bytes' "
         "unigram entropy is about 4.6)")
    save_checkpoint(args.out, model, "tiny_lm", (args.context,), 256, overwrite=args.force,
                    corpus=fp, val_bpb=bpb, steps=args.steps)
    note(f"wrote {args.out}\nnext: qfv lm ptq {args.out}")
    return 0


def run_ptq(args: argparse.Namespace) -> int:
    from qfv_brevitas.studies.lm import ptq_lm
    from qfv_brevitas.util.text import text_table

    model, train, val = _load(args)
    rows, out = {}, []
    for bits in args.bits:
        for comp in args.compensation:
            r = ptq_lm(model, train, val, bits, compensation=None if comp == "none" else comp,
                       per_channel=not args.per_tensor, calib_samples=args.calib_samples)
            out.append({"bits": bits, "compensation": comp, "float": r.float_acc,
                        "brevitas_mse_uniform": r.baseline_acc, "fitted": r.acc})
            rows[f"W{bits} {comp}"] = {
                "float": f"{r.float_acc:.4f}", "Brevitas uniform (MSE)": f"{r.baseline_acc:.4f}",
                "fitted N-mult": f"{r.acc:.4f}", "fitted - uniform": f"{r.acc - r.baseline_acc:+.4f}"}
    show(text_table(rows, "weights, compensation"))
    show("(validation bits per byte, lower is better)")
    _write_json(args, out)
    return 0


def run_qat(args: argparse.Namespace) -> int:
    from qfv_brevitas.studies.lm import LMRecipe, qat_lm
    from qfv_brevitas.training.lm import evaluate_bpb
    from qfv_brevitas.util.text import text_table

    model, train, val = _load(args, 32 * args.steps // 2)
    rows, out = {}, []
    for bits in args.bits:
        for method in args.methods:
            q, _ = qat_lm(model, train, val, bits, method,
                          LMRecipe(epochs=2, lr=args.lr, seed=args.seed),
                          progress=not args.no_progress)
            v = evaluate_bpb(q, val)
            out.append({"bits": bits, "method": method, "bpb": v})
            rows[f"W{bits} {method}"] = {"bits/byte": f"{v:.4f}"}
    show(text_table(rows, "weights, method"))
    show("(validation bits per byte, lower is better)")
    _write_json(args, out)
    return 0


def run_chip(args: argparse.Namespace) -> int:
    from qfv_brevitas.studies.lm import LMRecipe, chip_sweep_lm, fault_repair_lm, ptq_lm
    from qfv_brevitas.util.text import text_table

    model, train, val = _load(args, 32 * args.steps)
    q = ptq_lm(model, train, val, args.bits, baseline=None).model
    rows, out = {}, {"sweeps": []}
    for kind, levels in (("faults", args.stuck), ("variability", args.sigma)):
        for mapping in args.mapping if levels else ():
            for r in chip_sweep_lm(q, val, kind, levels, args.trials, seed=args.seed,
                                   mapping=mapping, progress=not args.no_progress):
                out["sweeps"].append(r)
                rows[f"{kind} {r['level']:g} {mapping}"] = {
                    "bits/byte": f"{r['mean']:.4f}", "std": f"{r['std']:.4f}",
                    "maps": r["trials"]}
    show(text_table(rows, "chip, level, mapping"))
    if args.repair_rate is not None:
        rep = fault_repair_lm(q, train, val, args.repair_rate, seed=args.seed,
                              recipe=LMRecipe(epochs=1, lr=args.lr, seed=args.seed),
                              progress=not args.no_progress)
        rep.pop("model")
        out["repair"] = rep
        show(f"one chip at {args.repair_rate:g} stuck: ideal {rep['ideal']:.4f}, naive "
             f"{rep['naive']:.4f}, nearest valid level {rep['aware']:.4f}, fault-aware "
             f"fine-tune {rep['repaired']:.4f} bits/byte")
    _write_json(args, out)
    return 0
