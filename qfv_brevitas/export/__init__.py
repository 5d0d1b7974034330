"""QONNX export of N-multiplier models: four forms (compact, bit planes, fixed point,
plane-parallel; one registered class each in :mod:`qfv_brevitas.export.forms`), the ``NMultWeight`` op domain, the per-layer multipliers in the file's
metadata, verification against torch, crossbar files.

>>> from qfv_brevitas.export import FORMS
>>> FORMS
('compact', 'bitplanes', 'fixed', 'planes')
"""
from qfv_brevitas.export.api import EXPORTERS, ExportResult, export_qonnx, reference_model
from qfv_brevitas.export.crossbar import load_crossbar, write_crossbar
from qfv_brevitas.export.errors import ExportError, ExportFileError, ExportVerificationError
from qfv_brevitas.export.fixedpoint import choose_frac_bits, fixed_point_layer, round_to_grid
from qfv_brevitas.export.forms import FORMS, ExportForm, form_named, register_form
from qfv_brevitas.export.graph import cleanup_qonnx, to_onnxruntime
from qfv_brevitas.export.metadata import format_layers, read_metadata
from qfv_brevitas.export.ops import NMultWeight, nmult_weight
from qfv_brevitas.export.verify import VerifyReport, verify_qonnx

__all__ = ["EXPORTERS", "FORMS", "ExportError", "ExportFileError", "ExportForm", "ExportResult",
           "ExportVerificationError", "NMultWeight", "form_named", "register_form", "VerifyReport", "choose_frac_bits", "cleanup_qonnx",
           "export_qonnx", "fixed_point_layer", "format_layers", "load_crossbar", "nmult_weight",
           "read_metadata", "reference_model", "round_to_grid", "to_onnxruntime", "verify_qonnx", "write_crossbar"]
