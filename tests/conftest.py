import pytest
import torch

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.data import load_digits_split
from qfv_brevitas.models import SmallCNN
from qfv_brevitas.train import TrainConfig, evaluate, fit

# CI runs the suite in 2 xdist workers on 2 cores: one intra-op thread per worker avoids
# oversubscription (measured: 2 threads per worker made a forward+backward ~20x slower).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN trained in float, quantized at W4 (float activations), QAT'd; eval mode.
    Returns ``(model, clean test accuracy)``; built once per test module."""
    train, test = digits
    torch.manual_seed(0)
    m = SmallCNN(1, 10, width=16)
    fit(m, train, None, TrainConfig(epochs=8, lr=0.05), progress=False)
    q = quantize_model(m, NMultConfig(weight_bits=4, act_bits=None, first_last_bits=None))
    fit(q, train, None, TrainConfig(epochs=4, lr=0.01, lambda_rise_epochs=2), progress=False)
    q.eval()
    clean = evaluate(q, test)
    assert clean > 0.95
    return q, clean


@pytest.fixture(scope="module", params=["kernels", "torch"])
def kernel_backend(request):
    """Runs a test module twice: on the compiled CPU kernels (skipped where they were not
    built) and on the pure-torch paths (``qfv_brevitas._kernels.torch_fallback``). Opt in with
    ``pytestmark = pytest.mark.usefixtures("kernel_backend")``."""
    from qfv_brevitas import _kernels as K

    if request.param == "kernels":
        if not K.available():
            pytest.skip(f"compiled kernels not built: {K.load_error()}")
        yield request.param
    else:
        with K.torch_fallback():
            yield request.param
