#!/usr/bin/env python
"""The plane-parallel form on FPGAs: weight memory, FINN resource estimates, exactness.

For one architecture of the digits benchmarks (``--arch mlp`` or ``small_cnn``) and one bit
width (``--bits 4``: W4A4 inner layers, 8-bit first/last layers as in the paper), in steps that
each fit a few minutes on 2 cores (run them in order; results accumulate in
``--out``/``<arch>_w<bits>.json``):

``train``   the library's own job, ``run_experiment`` (as ``qfv train``: float model 30 epochs,
            N-multiplier QAT 15 epochs, seed ``--seed``, per-tensor multipliers), and the same
            network quantized by **stock Brevitas** at uniform N bits: ``quantize_model``'s
            layers and activation quantizers with Brevitas' ``Int8WeightPerTensorFloat`` at
            ``bit_width=N`` (8 for first/last) as the weight quantizer, QAT'd with the same
            recipe (no regularizer: it has no N-multiplier layer).
``export``  the N-multiplier model in the fixed form with ``max_accuracy_drop=0.5`` (the
            smallest f within half a point of test accuracy: how the fixed form chooses f) and
            in the plane-parallel form at the same f; both at batch 1 (resource estimates)
            and with the whole test set as the batch (exactness runs); the stock model with
            Brevitas' own ``export_qonnx``. Records the weight memory of each form per layer,
            read from the files' metadata (planes: N bits per weight + the all-ones offset
            layer + the integer multipliers; fixed: the integer width of its levels per
            weight) and the fixed-point rounding of ``r`` (as the fixed form reports it).
``hls4ml``  ``export/hls4ml/run_hls4ml.py``'s ``build_hls_model`` + ``predict()`` on all test
            images, planes and fixed form, against the torch model (float32, the whole test
            set in one batch, and float64, the same network in double precision).
``finn``    ``export/finn/run_finn.py`` in the FINN environment (``.venv-finn``, or
            ``--finn-python``): the planes file on all test images (every stage against torch
            and the file; HW checks: each plane an MVAU with 1-bit weights, integer multipliers
            as ElementwiseMul; the SmallCNN's file at batch 1, run image by image, as FINN
            lowers convolutions at batch 1), then finn's analytical resource estimates (``--estimate``,
            folding to ``--target-cycles``) of the planes, fixed and stock files.
``summary`` prints the tables of every result file in ``--out`` (markdown).

``--frac-bits auto`` (issue 21) trains the N-multiplier model on the integer view (``qfv train
--frac-bits auto``: r and c on each layer's grid ``m * 2**-f`` while training, the weights
Brevitas ``IntQuantTensor`` s); its results go to ``<arch>_w<bits>_int.json`` (``--frac-bits 6``:
every layer on ``2**-6``, ``_int6.json``). ``train`` then
also records what the grid costs on the trained model (each layer's squared weight error on its
rounded levels against the same r, c unrounded), and ``export`` writes the fixed and planes
forms on the training grids (no search over f: no accuracy change by construction).

    python benchmarks/bench_planes.py --arch mlp --bits 4 --step train
    python benchmarks/bench_planes.py --arch mlp --bits 4 --step export
    python benchmarks/bench_planes.py --arch mlp --bits 4 --step hls4ml
    python benchmarks/bench_planes.py --arch mlp --bits 4 --step finn
    python benchmarks/bench_planes.py --step summary

Targets (printed PASS/FAIL, never a non-zero exit): FINN's HW graph and hls4ml's ``predict()``
agree with torch on every test image (100% top-1; max |diff| within 1e-4 * max(1, max|y|)).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, machine_line  # noqa: E402

TOL = 1e-4


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tag(args) -> str:
    view = {None: "", "auto": "_int"}.get(args.frac_bits, f"_int{args.frac_bits}")
    return f"{args.arch}_w{args.bits}{view}"


def _state(args) -> Path:
    return Path(args.out) / f"{_tag(args)}.json"


def _read(args) -> dict:
    p = _state(args)
    return json.loads(p.read_text()) if p.exists() else {}


def _write(args, res: dict) -> None:
    _state(args).write_text(json.dumps(res, indent=1))


def _dir(args) -> Path:
    d = Path(args.out) / _tag(args)
    d.mkdir(parents=True, exist_ok=True)
    return d


def stock_brevitas(float_model, bits: int, example):
    """``quantize_model``'s network (same layers, same activation quantizers, first/last at 8
    bits) with Brevitas' stock uniform weight quantizer ``Int8WeightPerTensorFloat`` at
    ``bits`` instead of an N-multiplier one."""
    from brevitas.quant import Int8WeightPerTensorFloat

    import qfv_brevitas.core.convert as C
    from qfv_brevitas import NMultConfig

    own = C.weight_quant_for
    C.weight_quant_for = lambda config, b, name=None: Int8WeightPerTensorFloat.let(bit_width=b)
    try:
        return C.quantize_model(float_model, NMultConfig(weight_bits=bits, act_bits=bits),
                                example_input=example)
    finally:
        C.weight_quant_for = own


def load_stock(d: Path, bits: int, seed: int):
    """The stock Brevitas model of ``step_train``, rebuilt and loaded (eval mode)."""
    import torch

    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import load_dataset

    fp, _ = load_checkpoint(d / "float.pt")
    train, _, _, _ = load_dataset("digits", None, seed)
    stock = stock_brevitas(fp, bits, train.tensors[0][:256])
    stock.load_state_dict(torch.load(d / "stock_state.pt"))
    return stock.eval()


def step_train(args) -> None:
    import copy

    import torch

    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import load_dataset
    from qfv_brevitas.studies.experiment import run_experiment
    from qfv_brevitas.training.train import TrainConfig, evaluate, fit

    d = _dir(args)
    t = time.perf_counter()
    res = run_experiment(d, arch=args.arch, bits=(args.bits,), variants=("nmult",),
                         seed=args.seed, progress=False, overwrite=True,
                         frac_bits=args.frac_bits)
    run = res["runs"][0]
    fp, _ = load_checkpoint(d / "float.pt")
    train, test, _, _ = load_dataset("digits", None, args.seed)
    example = train.tensors[0][:256]
    stock = stock_brevitas(copy.deepcopy(fp), args.bits, example)
    q_train = TrainConfig(**res["q_train"])
    fit(stock, train, None, q_train, progress=False)
    stock.eval()
    torch.save(stock.state_dict(), d / "stock_state.pt")
    out = {"arch": args.arch, "bits": args.bits, "seed": args.seed, "machine": machine_info(),
           "accuracy": {"float": 100 * res["fp_acc"], "nmult": 100 * run["acc"],
                        "stock": 100 * evaluate(stock, test)},
           "train_s": time.perf_counter() - t, "frac_bits": args.frac_bits}
    if args.frac_bits is not None:
        from qfv_brevitas import NMultConfig, quantize_model

        # at the start of QAT (levels fitted to the float weights): what rounding them costs
        start = quantize_model(copy.deepcopy(fp), NMultConfig(
            weight_bits=args.bits, act_bits=args.bits, frac_bits=args.frac_bits), example)
        out["grid_cost"] = grid_cost(start)
        model, _ = load_checkpoint(d / f"nmult_w{args.bits}a{args.bits}.pt")
        out["trained_grid"] = grid_cost(model)
        for row, end in zip(out["grid_cost"], out["trained_grid"]):
            print(f"  {row['layer']:<14} f={row['frac_bits']} int{row['int_bits']}: weight MSE "
                  f"of the fitted levels x{row['ratio']:.4f} on the grid; after QAT f="
                  f"{end['frac_bits']} int{end['int_bits']}")
    _write(args, out)
    print(f"{args.arch} W{args.bits}A{args.bits}: float {out['accuracy']['float']:.2f}%, "
          f"N-multiplier {out['accuracy']['nmult']:.2f}%, stock Brevitas uniform "
          f"{out['accuracy']['stock']:.2f}%")


def grid_cost(model) -> list:
    """Per layer of a model on the integer view: its f and integer width, and the squared
    weight error of its rounded levels against the same r, c unrounded."""
    from qfv_brevitas.core.fitting import grid_error
    from qfv_brevitas.core.quantizers import nmult_layers, quant_of

    rows = []
    for name, layer in nmult_layers(model):
        tq = quant_of(layer)
        w2d = tq.to_groups(layer.weight.detach())
        f = tq.frac_bits
        grid = float(grid_error(w2d, tq.levels().detach()).sum())
        width = int(tq.integer_width())
        tq.frac_bits = None
        real = float(grid_error(w2d, tq.levels().detach()).sum())
        tq.frac_bits = f
        n = w2d.numel()
        rows.append({"layer": name, "frac_bits": f, "int_bits": width, "mse_grid": grid / n,
                     "mse_real": real / n, "ratio": grid / real if real else float("nan")})
    return rows


def step_export(args) -> None:
    from brevitas.export import export_qonnx as brevitas_export

    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import load_dataset
    from qfv_brevitas.export import export_qonnx

    res = _read(args)
    d = _dir(args)
    model, _ = load_checkpoint(d / f"nmult_w{args.bits}a{args.bits}.pt")
    _, test, _, _ = load_dataset("digits", None, args.seed)
    x = test.tensors[0]
    if args.frac_bits is None:  # the smallest f within half a point
        fx = export_qonnx(model, x[:1], d / "fixed_b1.onnx", "fixed", max_accuracy_drop=0.5,
                          data=test, verify_inputs=x, overwrite=True)
    else:  # every layer on the grid it trained on
        fx = export_qonnx(model, x[:1], d / "fixed_b1.onnx", "fixed", data=test,
                          verify_inputs=x, overwrite=True)
    f = fx.fixed_point["frac_bits"]
    pl = export_qonnx(model, x[:1], d / "planes_b1.onnx", "planes", frac_bits=f,
                      verify_inputs=x, overwrite=True)
    for form in ("fixed", "planes"):  # the whole test set as the graph's batch: one run each
        export_qonnx(model, x, d / f"{form}_b{len(x)}.onnx", form, frac_bits=f, verify=False,
                     overwrite=True)
    stock = load_stock(d, args.bits, args.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        brevitas_export(stock, args=x[:1], export_path=str(d / "stock_b1.onnx"), dynamo=True,
                        optimize=True)
    layers = []
    for row_p, row_f in zip(pl.metadata["layers"], fx.metadata["layers"]):
        mem = row_p["planes"]["memory"]
        n = mem["weights"]
        layers.append({"layer": row_p["layer"], "bits": row_p["bits"],
                       "shape": row_p["weight_shape"], "weights": n,
                       "planes_bits": mem["total_bits"],
                       "planes_bits_per_weight": mem["bits_per_weight"],
                       "plane_bits": mem["plane_bits"], "ones_bits": mem["ones_bits"],
                       "multiplier_bits": mem["multiplier_bits"] + mem["offset_bits"],
                       "fixed_int_bits": row_f["fixed_point"]["int_bits"],
                       "fixed_bits": n * row_f["fixed_point"]["int_bits"],
                       "ratio": mem["total_bits"] / (n * row_f["fixed_point"]["int_bits"])})
    tot = pl.metadata["planes"]
    res["export"] = {
        "frac_bits": f, "layers": layers,
        "total": {"weights": tot["weights"], "planes_bits": tot["total_bits"],
                  "fixed_bits": tot["fixed_form_bits"],
                  "ratio": tot["total_bits"] / tot["fixed_form_bits"]},
        "fixed_point": {k: fx.fixed_point[k] for k in ("frac_bits", "accuracy",
                                                      "reference_accuracy",
                                                      "max_multiplier_error",
                                                      "max_weight_error")},
        "verify": {"planes": pl.verification.to_dict(), "fixed": fx.verification.to_dict()}}
    _write(args, res)
    print(f"f = {f}: weight memory planes {tot['total_bits']} bits vs fixed "
          f"{tot['fixed_form_bits']} bits (ratio {res['export']['total']['ratio']:.3f})")
    for r in layers:
        print(f"  {r['layer']:<14} N={r['bits']} planes {r['planes_bits_per_weight']:.3f} "
              f"bits/weight, fixed int{r['fixed_int_bits']}: ratio {r['ratio']:.3f}")


def _compare(y, ref) -> dict:
    import numpy as np

    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    err = np.abs(y - ref).reshape(len(ref), -1).max(1)
    bound = TOL * max(1.0, float(np.abs(ref).max()))
    return {"samples": int(len(ref)), "max_abs_diff": float(err.max()), "bound": bound,
            "within": float((err <= bound).mean()),
            "n_outside": int((err > bound).sum()),
            "top1": float((y.argmax(1) == ref.argmax(1)).mean())}


def _references(d: Path, bits: int, form_file: Path, x):
    """The torch reference of a file, on ``x``: float32 (whole batch) and float64."""
    import torch

    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.export import reference_model

    model, _ = load_checkpoint(d / f"nmult_w{bits}a{bits}.pt")
    ref = reference_model(model, form_file).eval()
    with torch.no_grad():
        y32 = ref(x).numpy()
        y64 = ref.double()(x.double()).numpy()
    return y32, y64


def _file_outputs(path: Path, x):
    """The file run by qonnx's ``execute_onnx`` on ``x`` (the file's batch is ``len(x)``)."""
    import numpy as np
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    mw = ModelWrapper(str(path))
    return np.asarray(execute_onnx(mw, {mw.graph.input[0].name: x.numpy()})[
        mw.graph.output[0].name])


def step_hls4ml(args) -> None:
    import numpy as np
    import shutil

    from qfv_brevitas.zoo.data import load_dataset

    flow = _load(_REPO / "export" / "hls4ml" / "run_hls4ml.py", "run_hls4ml")
    res = _read(args)
    d = _dir(args)
    _, test, _, _ = load_dataset("digits", None, args.seed)
    x = test.tensors[0]
    out = {}
    for form in ("planes", "fixed"):
        path = d / f"{form}_b1.onnx"
        t = time.perf_counter()
        prj = d / f"hls4ml_{form}"
        with contextlib.redirect_stdout(io.StringIO()):
            hm = flow.build_hls_model(path, prj)
        build_s = time.perf_counter() - t
        xh = x.numpy()
        if xh.ndim == 4:
            xh = xh.transpose(0, 2, 3, 1)
        y = np.asarray(hm.predict(np.ascontiguousarray(xh.astype(np.float32))))
        y32, y64 = _references(d, args.bits, path, x)
        y = y.reshape(y32.shape)
        yf = _file_outputs(d / f"{form}_b{len(x)}.onnx", x)
        out[form] = {"vs_torch": _compare(y, y32), "vs_torch_float64": _compare(y, y64),
                     "vs_file": _compare(y, yf), "torch_vs_file": _compare(y32, yf),
                     "torch_vs_float64": _compare(y32, y64), "build_s": build_s,
                     "precision": flow.default_precision(form),
                     "layers": flow.hls_layer_summary(hm)}
        shutil.rmtree(prj, ignore_errors=True)
        r = out[form]
        print(f"hls4ml {form}: vs torch max |diff| {r['vs_torch']['max_abs_diff']:.3g} "
              f"(bound {r['vs_torch']['bound']:.3g}, {r['vs_torch']['n_outside']} outside), "
              f"top-1 {100 * r['vs_torch']['top1']:.2f}%; vs torch float64 "
              f"{r['vs_torch_float64']['max_abs_diff']:.3g} "
              f"({r['vs_torch_float64']['n_outside']} outside); vs the file (qonnx) "
              f"{r['vs_file']['max_abs_diff']:.3g} ({r['vs_file']['n_outside']} outside); "
              f"torch vs the file: {r['torch_vs_file']['n_outside']} outside; build {build_s:.0f} s")
    res["hls4ml"] = out
    _write(args, res)
    r = out["planes"]
    ok = r["vs_torch"]["top1"] == 1.0 and r["vs_torch"]["n_outside"] == 0
    print(f"target hls4ml planes == torch on all {r['vs_torch']['samples']} images: "
          f"{'PASS' if ok else 'FAIL'} (top-1 {100 * r['vs_torch']['top1']:.2f}%, "
          f"{r['vs_torch']['n_outside']} outside the bound; hls4ml vs the file: "
          f"{r['vs_file']['n_outside']} outside)")


def _finn_python(args) -> str:
    py = args.finn_python or os.environ.get("QFV_FINN_PYTHON") or str(_REPO / ".venv-finn" /
                                                                        "bin" / "python")
    if not Path(py).exists():
        sys.exit(f"no FINN environment at {py}: run `bash export/finn/setup_finn.sh` or pass "
                 "--finn-python")
    return py


def step_finn(args) -> None:
    from qfv_brevitas.zoo.data import load_dataset

    res = _read(args)
    d = _dir(args)
    py = _finn_python(args)
    script = _REPO / "export" / "finn" / "run_finn.py"
    ckpt = d / f"nmult_w{args.bits}a{args.bits}.pt"
    _, test, _, _ = load_dataset("digits", None, args.seed)
    x = test.tensors[0]
    out = dict(res.get("finn") or {})
    if not args.estimates_only:
        out["exact"] = _finn_exact(args, d, py, script, ckpt, x)
    out.update(estimates=_finn_estimates(args, d, py, script, ckpt))
    res["finn"] = out
    _write(args, res)


def _finn_exact(args, d, py, script, ckpt, x) -> dict:
    """The FINN flow on the planes file on every test image: the MLP with the whole test set
    as the graph's batch (one execution per stage); the SmallCNN at batch 1, image by image
    (FINN lowers convolutions at batch 1)."""
    import numpy as np

    big = d / (f"planes_b{len(x)}.onnx" if args.arch == "mlp" else "planes_b1.onnx")
    t = time.perf_counter()
    proc = subprocess.run([py, str(script), str(big), str(ckpt), "--samples", str(len(x)),
                           "--json", str(d / "finn_planes.json"), "--save-outputs",
                           str(d / "finn_planes.npz")], capture_output=True, text=True)
    run_s = time.perf_counter() - t
    if not (d / "finn_planes.json").exists():
        sys.exit(f"the FINN flow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    flow = json.loads((d / "finn_planes.json").read_text())
    outs = dict(np.load(d / "finn_planes.npz"))
    y32, y64 = _references(d, args.bits, big, x)
    exact = {"passed": flow["passed"], "hw_problems": flow["hw_problems"],
             "node_types": flow["hw"]["node_types"], "run_s": run_s,
             "stages": {s: {"vs_torch": _compare(outs[s], y32),
                            "vs_torch_float64": _compare(outs[s], y64),
                            "vs_file": _compare(outs[s], outs["qonnx"])}
                        for s in ("qonnx", "finn", "streamlined", "hw")}}
    for s, r in exact["stages"].items():
        print(f"FINN {s:>11}: vs torch max |diff| {r['vs_torch']['max_abs_diff']:.3g} "
              f"({r['vs_torch']['n_outside']} outside {r['vs_torch']['bound']:.3g}), top-1 "
              f"{100 * r['vs_torch']['top1']:.2f}%; vs float64 "
              f"{r['vs_torch_float64']['max_abs_diff']:.3g}; vs file "
              f"{r['vs_file']['max_abs_diff']:.3g}")
    hw = exact["stages"]["hw"]["vs_torch"]
    print(f"target FINN HW == torch on all {hw['samples']} images: "
          f"{'PASS' if hw['top1'] == 1.0 and hw['n_outside'] == 0 else 'FAIL'}; HW checks "
          f"{'passed' if not flow['hw_problems'] else flow['hw_problems']}")
    return exact


def _finn_estimates(args, d, py, script, ckpt) -> dict:
    """finn's resource estimates of the planes, fixed and stock files (batch 1)."""
    out = {}
    for name in ("planes", "fixed", "stock"):
        path = d / f"{name}_b1.onnx"
        cmd = [py, str(script), str(path)] + ([str(ckpt)] if name != "stock" else []) + [
            "--samples", "8", "--estimate", "--target-cycles", str(args.target_cycles),
            "--json", str(d / f"finn_est_{name}.json")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if not (d / f"finn_est_{name}.json").exists():
            sys.exit(f"the FINN estimate of {name} failed:\n{proc.stdout[-3000:]}\n"
                     f"{proc.stderr[-3000:]}")
        est = json.loads((d / f"finn_est_{name}.json").read_text())["estimates"]
        out[name] = {"total": est["total"], "layers": est["layers"],
                     "max_cycles": est["max_cycles"], "target_cycles": est["target_cycles"],
                     "fpga_part": est["fpga_part"]}
        tt = est["total"]
        print(f"FINN estimate {name:>6}: LUT {tt['LUT']} (+{tt['arith_LUT']} elementwise "
              f"arithmetic), BRAM18 {tt['BRAM_18K']}, weight bits {tt['weight_bits']}, slowest "
              f"layer {est['max_cycles']} cycles")
    return out


def _label(r: dict) -> str:
    fb = r.get("frac_bits")
    view = "" if fb is None else " (int view, auto f)" if fb == "auto" else f" (int view, f={fb})"
    return f"{r['arch']} W{r['bits']}{view}"


def summary(args) -> None:
    files = sorted(Path(args.out).glob("*_w*.json"))
    if not files:
        sys.exit(f"no results in {args.out}")
    results = [json.loads(p.read_text()) for p in files]  # read once, used by every table
    print(machine_line())
    print("\n### Weight memory: planes vs fixed form (bits, from the files' metadata)\n")
    print("| model | f | accuracy N-mult / fixed-point | max \\|r - r_fixed\\| | planes bits | "
          "fixed bits | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "export" not in r:
            continue
        e = r["export"]
        fx = e["fixed_point"]
        print(f"| {_label(r)} | {e['frac_bits'] if e['frac_bits'] is not None else 'trained'} | "
              f"{fx['reference_accuracy']:.2f} / {fx['accuracy']:.2f} | "
              f"{fx['max_multiplier_error']:.3g} | {e['total']['planes_bits']} | {e['total']['fixed_bits']} | "
              f"**{e['total']['ratio']:.3f}** |")
    print("\nper layer (planes: N 1-bit planes + all-ones offset layer + integer multipliers; "
          "fixed: int width of the levels):\n")
    print("| model | layer | N | weights | planes bits/weight | fixed bits/weight | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for l in r.get("export", {}).get("layers", []):
            print(f"| {_label(r)} | {l['layer']} | {l['bits']} | {l['weights']} | "
                  f"{l['planes_bits_per_weight']:.3f} | {l['fixed_int_bits']} | "
                  f"{l['ratio']:.3f} |")
    print("\n### The integer view: accuracy and what the grid costs\n")
    print("| model | accuracy float / N-mult / stock | layer | at the start: f, int width, weight "
          "MSE grid / unrounded | after QAT: f, int width |")
    print("|---|---|---|---|---|")
    for r in results:
        acc = r.get("accuracy", {})
        for g, e in zip(r.get("grid_cost", []), r.get("trained_grid", [])):
            print(f"| {_label(r)} | {acc.get('float', 0):.2f} / {acc.get('nmult', 0):.2f} / "
                  f"{acc.get('stock', 0):.2f} | {g['layer']} | {g['frac_bits']}, "
                  f"int{g['int_bits']}, x{g['ratio']:.4f} | {e['frac_bits']}, int{e['int_bits']} |")
    print("\n### FINN estimates (LUT, BRAM18, weight bits) per layer\n")
    print("| model | layer | planes LUT (+arith) | fixed LUT | stock LUT | planes BRAM | fixed "
          "BRAM | stock BRAM | planes wbits | fixed wbits | stock wbits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        est = r.get("finn", {}).get("estimates")
        if not est:
            continue
        rows = {k: est[k]["layers"] for k in ("planes", "fixed", "stock")}
        for i, lp in enumerate(rows["planes"]):
            lf = rows["fixed"][i] if i < len(rows["fixed"]) else {}
            ls = rows["stock"][i] if i < len(rows["stock"]) else {}
            print(f"| {_label(r)} | {lp['layer']} | {lp['LUT']} (+{lp['arith_LUT']}) "
                  f"| {lf.get('LUT', '')} | {ls.get('LUT', '')} | {lp['BRAM_18K']} | "
                  f"{lf.get('BRAM_18K', '')} | {ls.get('BRAM_18K', '')} | {lp['weight_bits']} | "
                  f"{lf.get('weight_bits', '')} | {ls.get('weight_bits', '')} |")
        tp, tf, ts = (est[k]["total"] for k in ("planes", "fixed", "stock"))
        print(f"| {_label(r)} | **total** | **{tp['LUT']}** (+{tp['arith_LUT']}) | "
              f"**{tf['LUT']}** | **{ts['LUT']}** | **{tp['BRAM_18K']}** | **{tf['BRAM_18K']}** | "
              f"**{ts['BRAM_18K']}** | **{tp['weight_bits']}** | **{tf['weight_bits']}** | "
              f"**{ts['weight_bits']}** |")
    print("\n### Exactness on all test images\n")
    print("| model | FINN HW vs torch: max diff (outside bound) | top-1 | FINN HW vs file | "
          "hls4ml planes vs torch (outside) | top-1 | torch float32 vs float64 (outside) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ex = r.get("finn", {}).get("exact")
        h = r.get("hls4ml", {}).get("planes")
        if not ex or not h:
            continue
        hw = ex["stages"]["hw"]
        print(f"| {_label(r)} | {hw['vs_torch']['max_abs_diff']:.2g} "
              f"({hw['vs_torch']['n_outside']}) | {100 * hw['vs_torch']['top1']:.2f}% | "
              f"{hw['vs_file']['max_abs_diff']:.2g} | {h['vs_torch']['max_abs_diff']:.2g} "
              f"({h['vs_torch']['n_outside']}) | {100 * h['vs_torch']['top1']:.2f}% | "
              f"{h['torch_vs_float64']['max_abs_diff']:.2g} "
              f"({h['torch_vs_float64']['n_outside']}) |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("mlp", "small_cnn"), default="mlp")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", choices=("train", "export", "hls4ml", "finn", "summary"),
                   required=True)
    p.add_argument("--out", default="runs/bench_planes")
    p.add_argument("--target-cycles", type=int, default=512,
                   help="FINN folding target (cycles per image) for the estimates")
    p.add_argument("--frac-bits", default=None,
                   type=lambda t: t if t == "auto" else int(t),
                   help="train on the integer view (auto or 0..20); results in *_int.json")
    p.add_argument("--finn-python", help="interpreter of the FINN environment")
    p.add_argument("--estimates-only", action="store_true",
                   help="finn step: only the resource estimates (batch-1 files), not the "
                        "exactness run on all test images")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.step != "summary":
        print(machine_line())
    {"train": step_train, "export": step_export, "hls4ml": step_hls4ml, "finn": step_finn,
     "summary": summary}[args.step](args)


if __name__ == "__main__":
    main()
