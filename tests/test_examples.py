"""Each user story in examples/ runs on small data."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quantize_brevitas_model_swaps_and_fine_tunes():
    from qfv_brevitas import nmult_layers, quant_of

    ex = load("quantize_brevitas_model")
    before, acc, hist = ex.main(["--epochs", "2", "--bits", "3"])
    # The Brevitas model learned (10 classes: chance is 0.1) and the swapped model still works.
    assert before > 0.8
    assert acc > 0.8
    assert hist["reg"][-1] < hist["reg"][0]


def test_quantize_finn_style_brevitas_model_exports_on_its_training_grids(tmp_path):
    """Int32Bias and quant tensors between the layers: the swapped layers that need it train on
    the integer view, and the fixed QONNX form keeps their grids (no accuracy change)."""
    from brevitas.quant_tensor import IntQuantTensor

    from qfv_brevitas import nmult_layers

    ex = load("quantize_brevitas_model")
    before, acc, hist, res = ex.main(["--epochs", "2", "--bits", "3", "--finn-style",
                                      "--export", str(tmp_path)])
    assert before > 0.8 and acc > 0.8
    assert res.verification.passed
    fx = res.fixed_point
    assert fx["accuracy"] == fx["reference_accuracy"] == 100 * acc
    rows = res.metadata["layers"]
    assert len(rows) == 4 and all("integer_view" in r for r in rows)
    assert all(r["fixed_point"]["frac_bits"] == r["integer_view"]["frac_bits"] for r in rows)
    model_layers = dict(nmult_layers(res.reference))
    assert all(isinstance(model_layers[r["layer"]].quant_weight(), IntQuantTensor) for r in rows)


def test_resnet18_cifar10_on_generated_data():
    """Without torchvision or CIFAR-10: the project's CIFAR-shaped ResNet-18, W4A4, learns the
    generated classes (chance is 0.1; measured 1.00, 0.80, 0.89, 0.83 on the 64 test images with
    seeds 0-3)."""
    from qfv_brevitas import nmult_layers, quant_of
    from qfv_brevitas.zoo.models import ResNetCIFAR

    ex = load("resnet18_cifar10")
    acc, q = ex.main(["--fake-data", "256", "--epochs", "3", "--width", "8", "--lr", "0.05",
                      "--batch-size", "16"])
    assert isinstance(q, ResNetCIFAR)
    bits = {n: quant_of(l).bits for n, l in nmult_layers(q)}
    assert len(bits) == 21  # 17 3x3 convs, 3 shortcut projections, the classifier
    assert sorted(set(bits.values())) == [4, 8] and list(bits.values()).count(8) == 2
    assert acc >= 0.6


def test_finetune_for_chip_recovers_accuracy():
    ex = load("finetune_for_chip")
    ideal, as_is, nearest_valid, repaired = ex.main(
        ["--rate", "0.2", "--seed", "7", "--epochs", "8", "--finetune-epochs", "3"])
    assert ideal > 0.9
    # The faulty chip hurts, and fault-aware fine-tuning recovers most of it.
    assert as_is < ideal - 0.05
    assert repaired > nearest_valid and repaired > ideal - 0.05


def test_snn_digits_spiking_w4_and_faults():
    pytest.importorskip("spikingjelly")
    ex = load("snn_digits")
    fp, w4, faulty = ex.main(["--epochs", "3", "--qat-epochs", "1", "--trials", "2"])
    # Chance is 0.1; 3 + 1 epochs on rate-coded digits reach ~0.85 (measured 0.85 / 0.84).
    assert fp > 0.7 and w4 > 0.7
    assert faulty <= w4  # 10% stuck bits in the inner layer (measured 0.83)


def test_export_to_hls4ml(tmp_path):
    ex = load("export_to_hls4ml")
    acc, results, hls = ex.main(["--out", str(tmp_path), "--epochs", "8", "--max-drop", "1.0",
                                 "--hidden", "32"])
    assert acc > 0.85  # measured 0.93 (seed 0)
    assert all(r.verification.passed for r in results.values())
    fx = results["fixed"].fixed_point
    assert fx["reference_accuracy"] - fx["accuracy"] <= 1.0
    try:
        import hls4ml  # noqa: F401
    except ImportError:
        assert hls is None
    else:
        assert hls["top1_agreement"] == 1.0
        assert hls["max_abs_diff"] <= 1e-4 * max(1.0, hls["max_abs_output"])


def test_transformer_lm_trains_quantizes_and_meets_the_chip():
    """The language-model story on a tiny model and a few hundred steps: every stage runs and
    is scored in bits per byte; 2-bit weights cost more than 4-bit ones, stuck bits cost bits
    per byte, and GPTQ helps the fitted 2-bit levels."""
    ex = load("transformer_lm")
    out = ex.main(["--steps", "384", "--lr", "0.02", "--dim", "32", "--layers", "1",
                   "--heads", "2", "--context", "16", "--val-bytes", "1024", "--ptq-bits", "4", "2",
                   "--qat-steps", "16", "--fault-rates", "0", "0.1", "--trials", "2"])
    assert out["float"] < 5.0
    w4, w2 = out["ptq"][(4, None)], out["ptq"][(2, None)]
    assert out["float"] < w4[0] < w2[0] and out["ptq"][(2, "gptq")][0] < w2[0]
    assert set(out["qat"]) == {"paper", "both", "brevitas"}
    faults = out["faults"]
    assert faults[0]["mean"] < faults[1]["mean"]
    assert out["repair"]["naive"] > out["repair"]["ideal"]
