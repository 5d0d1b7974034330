#!/usr/bin/env python3
"""What the export forms write: export every form of the zoo's models (both exporters) and
list the op types per domain, element types, opsets and sizes, against the allow-list of
``qfv_brevitas.export.structure`` (``ALLOWED_OPS``, ``ALLOWED_DTYPES``).

The allow-list of files a user gives was collected this way; run it after adding a model, a
layer type or a form, and extend the list by what it reports as outside (exit 1 then):

    flock /tmp/qfv-cpu.lock .venv/bin/python tools/export_ops.py            # the small models
    flock /tmp/qfv-cpu.lock .venv/bin/python tools/export_ops.py --all      # + VGG, ResNet-18

Measured when the list was made (these models, plus per-channel multipliers, binary
activations, a fault map, a variability map and brevitas_examples' bnn_pynq ResNet-18 with its
truncating average pool): 21 ONNX op types, 3 QONNX ones, ``NMultWeight``; element types
float32, uint8, int64 (bool declared); IR 9-10, opset 20; at most 466 nodes (ResNet-18,
plane-parallel form) and 179 MB (bnn_pynq ResNet-18, bit-plane form).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _zoo(name: str, shape, act_bits) -> Callable:
    def build():
        import torch

        from qfv_brevitas import NMultConfig, quantize_model
        from qfv_brevitas.zoo.models import build_model

        torch.manual_seed(0)
        x = torch.rand(4, *shape)
        net = build_model(name, shape, 10)
        return quantize_model(net, NMultConfig(weight_bits=3, act_bits=act_bits), x[:2]).eval(), x
    return build


def _spiking(name: str) -> Callable:
    def build():
        import torch

        from qfv_brevitas import NMultConfig, quantize_model
        from qfv_brevitas.snn import rate_encode
        from qfv_brevitas.snn.network import spiking_net
        from qfv_brevitas.zoo.models import build_model

        net = build_model(name, (1, 8, 8), 10, snn={"T": 3})
        q = quantize_model(net, NMultConfig(weight_bits=3, act_bits=None),
                           torch.rand(2, 1, 8, 8)).eval()
        cfg = spiking_net(q).config
        x = rate_encode(torch.rand(4, 1, 8, 8), cfg.T,
                        generator=torch.Generator().manual_seed(0))
        return q, (x if cfg.layout == "time_first" else x.transpose(0, 1))
    return build


def models(everything: bool) -> Dict[str, Callable]:
    out = {"mlp-a4": _zoo("mlp", (1, 8, 8), 4), "mlp-float": _zoo("mlp", (1, 8, 8), None),
           "cnn-a4": _zoo("small_cnn", (1, 8, 8), 4), "snn-mlp": _spiking("spiking_mlp"),
           "snn-cnn": _spiking("spiking_small_cnn")}
    if everything:
        out.update({"vgg": _zoo("vgg", (3, 32, 32), 4),
                    "resnet18": _zoo("resnet18", (3, 32, 32), 4)})
    return out


def collect(builders: Dict[str, Callable], folder: Path) -> Tuple[dict, List[str]]:
    """Export every form of every model with both exporters; what the files hold."""
    import onnx

    from qfv_brevitas.export import FORMS, export_qonnx, form_named

    seen: dict = {"ops": defaultdict(set), "dtypes": set(), "opsets": set(), "nodes": 0,
                  "bytes": 0}
    failed = []
    for name, build in builders.items():
        for form in FORMS:
            for exporter in ("dynamo", "torchscript"):
                model, x = build()
                first = x[:, :1] if name.startswith("snn") else x[:1]
                path = folder / f"{name}-{form}-{exporter}.onnx"
                kw = {"frac_bits": 8} if form_named(form).needs_fixed_point else {}
                try:
                    export_qonnx(model, first, path, form, exporter=exporter, verify_inputs=x,
                                 **kw)
                except Exception as e:  # e.g. spiking models export with dynamo only
                    failed.append(f"{name} {form} {exporter}: {type(e).__name__}")
                    continue
                m = onnx.load(str(path))
                for n in m.graph.node:
                    seen["ops"]["" if n.domain == "ai.onnx" else n.domain].add(n.op_type)
                seen["dtypes"] |= {t.data_type for t in m.graph.initializer}
                seen["opsets"] |= {(o.domain, o.version) for o in m.opset_import}
                seen["nodes"] = max(seen["nodes"], len(m.graph.node))
                seen["bytes"] = max(seen["bytes"], path.stat().st_size)
    return seen, failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="also VGG and ResNet-18 (slow)")
    args = p.parse_args(argv)
    from qfv_brevitas.export.structure import ALLOWED_DTYPES, ALLOWED_OPS

    with tempfile.TemporaryDirectory() as tmp:
        seen, failed = collect(models(args.all), Path(tmp))
    outside = []
    for domain, ops in sorted(seen["ops"].items()):
        print(f"{domain or 'ai.onnx'}: {', '.join(sorted(ops))}")
        outside += [f"{domain or 'ai.onnx'}::{o}" for o in ops
                    if o not in ALLOWED_OPS.get(domain, ())]
    outside += [f"element type {d}" for d in seen["dtypes"] - ALLOWED_DTYPES]
    print(f"element types {sorted(seen['dtypes'])}, opsets {sorted(seen['opsets'])}, "
          f"at most {seen['nodes']} nodes and {seen['bytes']} bytes")
    for f in failed:
        print(f"not exported: {f}")
    if outside:
        print(f"OUTSIDE the allow-list: {', '.join(outside)}")
        return 1
    print("all within the allow-list")
    return 0


if __name__ == "__main__":
    sys.exit(main())
