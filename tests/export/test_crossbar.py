"""Tests of ``qfv_brevitas.export.crossbar``'s reader against hostile folders (issue 22): the
manifest is parsed within the JSON budgets, every array file's headers are checked before
numpy allocates from them, and a layer file must be a file of the folder itself."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.export import load_crossbar, write_crossbar


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    q = quantize_model(net, NMultConfig(weight_bits=3, act_bits=None), torch.rand(4, 1, 4, 4))
    write_crossbar(q, tmp_path / "xb")
    return tmp_path / "xb"


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _seal(folder, name, data: bytes):
    (folder / name).write_bytes(data)
    m = _manifest(folder)
    for row in m["layers"]:
        if row["file"] == name:
            row["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


def test_a_deep_manifest_is_refused_before_parsing(folder):
    assert load_crossbar(folder)
    (folder / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=r"manifest\.json: JSON nested 200000 levels deep"):
        load_crossbar(folder)


def test_an_array_header_that_lies_is_refused_before_numpy_allocates(folder):
    name = _manifest(folder)["layers"][0]["file"]
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False,
                                                "shape": (10 ** 12,)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("planes.npy", head.getvalue() + bytes(16))
    _seal(folder, name, buf.getvalue())
    with pytest.raises(ValueError, match=r"\('planes\.npy'\): its array header declares shape "
                                         r"\(1000000000000,\)"):
        load_crossbar(folder)


def test_a_layer_file_outside_the_folder_is_refused(folder, tmp_path):
    (tmp_path / "outside.npz").write_bytes(b"secret")
    m = _manifest(folder)
    m["layers"][0]["file"] = "../outside.npz"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"layer file '\.\./outside\.npz' is not a file of the "
                                         r"folder itself"):
        load_crossbar(folder)
