#!/usr/bin/env bash
# Install finn-plus 1.6.1 into its own virtual environment, beside this repository's packages.
#
#   bash export/finn/setup_finn.sh            # -> .venv-finn at the repository root
#   FINN_VENV=/some/where bash export/finn/setup_finn.sh
#   TORCH="torch==2.13.0" PYTHON=python3.11 bash export/finn/setup_finn.sh
#
# Why a separate environment: finn-plus 1.6.1 pins brevitas==0.13.0, onnx==1.21.0,
# onnxruntime==1.25.1, protobuf==5.29.6 and pulls (through brevitas) an unpinned, CUDA-sized
# torch. Installed normally it would downgrade what this project's .venv is tested with. So
# finn-plus is installed with --no-deps on top of this project's own stack (brevitas 0.13.4,
# onnx 1.23, qonnx 1.0.0, torch 2.13.0 CPU), and then only the runtime packages that the
# FINN steps used by export/finn/run_finn.py import (QONNX->FINN conversion, streamlining,
# conversion to HW layers, Python execution). Each was found by importing those steps and
# installing what was missing; versions are the ones this was tested with, inside finn-plus's
# own declared ranges where it has one. Not installed (not imported by those steps): pandas,
# mip, cmake, pybind11, onnx-passes, mashumaro, termcolor, i.e. the builder (build_dataflow),
# the QoR estimators and the multi-FPGA partitioner, which need Vivado/Vitis anyway.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${FINN_VENV:-$ROOT/.venv-finn}"
PYTHON="${PYTHON:-python3}"
# torch first and pinned (as in the Makefile): an unpinned torch pulls a multi-GB CUDA build.
TORCH="${TORCH:-torch==2.13.0}"

start=$(date +%s)
"$PYTHON" - <<'EOF'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"finn-plus 1.6.1 needs Python >= 3.11, this is {sys.version.split()[0]}: "
             "set PYTHON=python3.11 (or newer)")
EOF
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH"
# This repository (editable) with its own dependencies: brevitas 0.13.4, onnx, onnxruntime,
# qonnx 1.0.0, numpy, scikit-learn (which brings scipy), matplotlib.
"${PIP[@]}" -e "$ROOT"
# finn-plus itself, without its pins (see above).
"${PIP[@]}" --no-deps "finn-plus==1.6.1"
# What the Python steps of finn-plus import beyond the above:
#   scipy     - finn.custom_op.fpgadataflow.* (the HW ops MVAU, Thresholding, ...) import it.
#               qonnx's op registry swallows the ImportError of a domain module, so without
#               scipy the HW ops are silently unknown and execution fails far from the cause.
#               scikit-learn already brings it; pinned here to finn-plus's range (>=1.17,<1.18).
#   pyyaml    - finn.util.basic -> finn.interface.settings (read by every HW op module).
#   pydantic  - finn.interface.settings (the settings model).
#   click     - finn.interface.interface_utils, imported by the settings module.
#   rich      - finn.util.logging, imported by ConvertQONNXtoFINN and the streamlining passes.
# pip then prints "ERROR: pip's dependency resolver ..." listing finn-plus's pins as unmet
# (brevitas==0.13.0, onnx==1.21.0, ...): expected, that is the point of --no-deps; the import
# check below is what tells whether the environment works.
"${PIP[@]}" "scipy==1.17.1" "pyyaml==6.0.3" "pydantic==2.14.3" "click==8.5.1" "rich==13.9.4"

# Fail here, not later, if a step the flow uses cannot be imported or the HW ops do not
# register (the registry would otherwise hide the cause).
"$VENV/bin/python" - <<'EOF'
import finn.custom_op.fpgadataflow.hls  # noqa: F401  (registers the HLS variants)
import finn.custom_op.fpgadataflow.rtl  # noqa: F401
from finn.core.onnx_exec import execute_onnx  # noqa: F401
from finn.transformation.fpgadataflow.convert_to_hw.quantized_matrix_vector_activation import (  # noqa: F401
    InferQuantizedMatrixVectorActivation)
from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN  # noqa: F401
from finn.transformation.streamline import Streamline  # noqa: F401
from qonnx.custom_op.registry import getCustomOp
from onnx import helper
node = helper.make_node("MVAU", ["x", "w"], ["y"], domain="finn.custom_op.fpgadataflow")
getCustomOp(node)  # raises if the HW ops did not register
from importlib.metadata import version
print("finn-plus ready:", ", ".join(f"{p} {version(p)}" for p in
                                    ("finn-plus", "brevitas", "qonnx", "onnx", "torch")))
EOF
echo "installed into $VENV in $(( $(date +%s) - start )) s"
echo "run: $VENV/bin/python export/finn/run_finn.py MODEL.onnx CHECKPOINT.pt"
