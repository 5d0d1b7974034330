"""GPU readiness: the training step makes no host sync, and everything runs on CUDA.

No GPU in CI: the CUDA tests skip there. The sync-free code paths (``levels.sync_free``: what a
CUDA tensor takes) are also checked on the CPU: with ``search.GPU_PATHS_ON_CPU`` and the torch
fallback, a TorchFunctionMode counts every call that would wait for a GPU (``.item()``,
``bool(tensor)``, ``float(tensor)``, ``.tolist()``, ``nonzero``) during a training step.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.core import kernels as K
from qfv_brevitas.core import levels as L
from qfv_brevitas.core import search as S
from qfv_brevitas.chip.faults import FaultModel, attach_faults, sample_fault_map
from qfv_brevitas.training.regularizer import QuantRegularizer
from qfv_brevitas.core.config import LambdaSchedule
from qfv_brevitas.chip.variability import VariabilityModel, attach_variability, sample_variability_map

SYNCS = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist", "nonzero", "numpy")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


class SyncSpy(TorchFunctionMode):
    """Records the tensor calls that read a value back to the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gpu_paths_on_cpu():
    with K.torch_fallback(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "GPU_PATHS_ON_CPU", True)
        yield


def _model(mode: str, device="cpu") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(),
                        nn.Linear(16, 4))
    q = quantize_model(net, NMultConfig(weight_bits=4, act_bits=None, mode=mode,
                                        first_last_bits=None))
    return q.to(device).train()


def _attach(model, maps):
    if "faults" in maps:
        attach_faults(model, sample_fault_map(model, FaultModel(rate=0.2, seed=1)))
    if "variability" in maps:
        attach_variability(model, sample_variability_map(model, VariabilityModel(
            sigma=0.2, hrs_on_off=10, seed=2)))


def _step(model, x, y, reg, opt):
    loss = nn.functional.cross_entropy(model(x), y) + reg(0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


MAPS = [(), ("faults",), ("variability",), ("faults", "variability")]


@pytest.mark.parametrize("mode", ["paper", "both"])
@pytest.mark.parametrize("maps", MAPS)
def test_training_step_on_the_gpu_paths_reads_nothing_back(mode, maps):
    with gpu_paths_on_cpu():
        model = _model(mode)
        _attach(model, maps)
        reg = QuantRegularizer(model, LambdaSchedule(4, rise_epochs=2))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        _step(model, x, y, reg, opt)  # warm-up
        with SyncSpy() as spy:
            loss = _step(model, x, y, reg, opt)
        assert spy.calls == [], spy.calls
        assert bool(torch.isfinite(loss))


def test_the_spy_sees_a_sync():
    # The check above can fail: a per-layer .item() in the step is seen.
    with SyncSpy() as spy:
        float(torch.ones(2).sum())
        bool(torch.ones(1) > 0)
    assert spy.calls == ["__float__", "__bool__"]


def test_the_cpu_paths_do_sync():
    # Without the GPU paths, the CPU's torch search builds its lookup table (host reads):
    # the switch above is what removed them.
    with K.torch_fallback():
        model = _model("paper")
        reg = QuantRegularizer(model, LambdaSchedule(4, rise_epochs=2))
        with SyncSpy() as spy:
            reg(0)
    assert spy.calls


@pytest.mark.parametrize("maps", MAPS)
def test_gpu_paths_give_the_cpu_results(maps):
    # Same loss and gradients on the sync-free paths as on the CPU's own.
    out = []
    for ctx in (contextlib.nullcontext, gpu_paths_on_cpu):
        with ctx():
            model = _model("paper")
            _attach(model, maps)
            reg = QuantRegularizer(model, LambdaSchedule(4, rise_epochs=2))
            loss = reg(0)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                        if p.grad is not None]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ on a real GPU


@needs_cuda
@pytest.mark.parametrize("mode", ["paper", "both"])
@pytest.mark.parametrize("maps", MAPS)
def test_cuda_training_step_without_sync(mode, maps):
    model = _model(mode, "cuda")
    _attach(model, maps)
    reg = QuantRegularizer(model, LambdaSchedule(4, rise_epochs=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 1, 8, 8, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    _step(model, x, y, reg, opt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, x, y, reg, opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_cuda_matches_cpu_and_runs_the_jobs(tmp_path):
    from qfv_brevitas.studies import evaluate_faults, evaluate_variability
    from qfv_brevitas.export import export_qonnx
    from qfv_brevitas.training.train import TrainConfig, evaluate, fit
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,),
                                                                              generator=g))
    cpu = _model("paper")
    gpu = _model("paper", "cuda")
    reg_c = QuantRegularizer(cpu, LambdaSchedule(4))(0)
    reg_g = QuantRegularizer(gpu, LambdaSchedule(4))(0)
    torch.testing.assert_close(reg_g.cpu(), reg_c, rtol=1e-5, atol=1e-6)
    fit(gpu, data, data, TrainConfig(epochs=1, batch_size=16), progress=False)
    assert 0 <= evaluate(gpu, data) <= 1
    res = evaluate_faults(gpu, data, [0.0, 0.1], trials=2, progress=False)
    assert len(res.rows) == 4
    res = evaluate_variability(gpu, data, [0.2], trials=2, progress=False)
    assert len(res.rows) == 2
    export_qonnx(gpu.eval(), torch.randn(2, 1, 8, 8, device="cuda"), tmp_path / "m.onnx")
