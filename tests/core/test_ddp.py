"""DistributedDataParallel with N-multiplier quantizers and the regularizer (2 CPU processes,
gloo, file:// rendezvous so that no TCP port has to be picked for the store).

Each rank trains the same converted model on its own random data with
``loss = CE + lambda * regularization_loss(ddp_model)``; afterwards every parameter (weights,
``r``, ``c``, activation scales) must be bitwise identical on both ranks. Two forward modes run
in the same processes: ``paper`` (r and c get their gradient from the regularizer only) and
``both`` (STE forward + regularizer: r and c also get a data-dependent gradient, so without the
all-reduce they would drift apart; the workers verify that by also taking one local,
unsynchronised gradient).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 5
LAMBDA = 50.0
MODES = ("paper", "both")
TIMEOUT_S = 120


def _model(mode: str) -> nn.Module:
    from qfv_brevitas import NMultConfig, quantize_model
    torch.manual_seed(0)  # the same model on every rank (DDP broadcasts rank 0's anyway)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = NMultConfig(weight_bits=3, act_bits=4, mode=mode, act_collect_stats_steps=2)
    return quantize_model(m, cfg, example_input=torch.rand(2, 1, 8, 8))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from qfv_brevitas import regularization_loss
        from qfv_brevitas.training.train import TrainConfig, param_groups

        results = {}
        for mode in MODES:
            model = _model(mode)
            model.train()
            ddp = DDP(model)
            initial = {k: p.detach().clone() for k, p in model.named_parameters()}
            # Built after wrapping, as DDP requires.
            opt = torch.optim.SGD(
                param_groups(ddp, TrainConfig(lr=0.05, quant_lr=1e-3, weight_decay=0.0)),
                lr=0.05, momentum=0.9)
            g = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
            regs, tasks = [], []
            for _ in range(STEPS):
                x = torch.randn(16, 1, 8, 8, generator=g)
                y = torch.randint(0, 4, (16,), generator=g)
                task = nn.functional.cross_entropy(ddp(x), y)
                reg = regularization_loss(ddp)
                loss = task + LAMBDA * reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                regs.append(float(reg.detach()))
                tasks.append(float(task.detach()))
            final_reg = float(regularization_loss(ddp).detach())
            params = {k: p.detach().clone() for k, p in model.named_parameters()}
            # One local gradient without the all-reduce, to show what would drift without it.
            x = torch.randn(16, 1, 8, 8, generator=g)
            y = torch.randint(0, 4, (16,), generator=g)
            opt.zero_grad(set_to_none=True)
            with ddp.no_sync():
                (nn.functional.cross_entropy(ddp(x), y) + LAMBDA * regularization_loss(ddp)
                 ).backward()
            local_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()
                           if p.grad is not None}
            results[mode] = {"initial": initial, "params": params, "regs": regs,
                             "final_reg": final_reg, "tasks": tasks, "local_grads": local_grads}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend of torch.distributed is not available in this torch build")
    tmp = tmp_path_factory.mktemp("ddp")
    init_file = tmp / "rendezvous"  # must not exist yet
    ctx = mp.start_processes(_worker, args=(str(init_file), str(tmp)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # raises if a worker failed, with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("mode", MODES)
def test_ranks_stay_identical(ddp_results, mode):
    r0, r1 = (res[mode] for res in ddp_results)
    assert r0["params"].keys() == r1["params"].keys()
    names = list(r0["params"])
    quant = [k for k in names if k.endswith((".tensor_quant.r", ".tensor_quant.c"))]
    weights = [k for k in names if k.endswith(".weight") and "quant" not in k]
    scales = [k for k in names if "input_quant" in k]
    assert len(quant) == 2 * 4 and len(weights) == 5 and len(scales) == 4  # 4 layers + BN
    # (a) every parameter bitwise identical across the ranks.
    for k in names:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    # (b) r, c (and the weights) did move, so the check above could have failed.
    for k in quant + weights:
        assert not torch.equal(r0["params"][k], r0["initial"][k]), f"{k} never changed"
        assert (r0["params"][k] - r0["initial"][k]).abs().max() > 1e-6, k
    # The ranks did see different data ...
    assert all(a != b for a, b in zip(r0["tasks"], r1["tasks"]))
    # ... and their local (unsynchronised) gradients differ: weights in both modes, r and c
    # when the STE forward feeds the task gradient into them.
    g0, g1 = r0["local_grads"], r1["local_grads"]
    for k in weights:
        assert not torch.equal(g0[k], g1[k]), k
    if mode == "both":
        for k in quant:
            assert not torch.equal(g0[k], g1[k]), k
    # (c) the regularizer agrees step by step, and training lowered it.
    assert r0["regs"] == r1["regs"]
    assert r0["final_reg"] == r1["final_reg"]
    assert r0["final_reg"] < r0["regs"][0]
