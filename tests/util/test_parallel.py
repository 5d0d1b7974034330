"""Monte Carlo trials over worker processes and over torch.distributed ranks give the rows of
a single-process run (same seeds), in the same order."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from qfv_brevitas import NMultConfig, quantize_model
from qfv_brevitas.studies import evaluate_faults
from qfv_brevitas.studies.compare import compare_methods
from qfv_brevitas.studies.engine import CompareConfig
from qfv_brevitas.studies.montecarlo import evaluate_bitflips, evaluate_variability
from qfv_brevitas.studies.scenario import scenarios
from qfv_brevitas.util.parallel import run_tasks
from qfv_brevitas.training.train import TrainConfig

WORLD = 2
TIMEOUT_S = 120


def _fail_on_three(i):
    if i == 3:
        raise KeyError("task three")
    return i * i


def test_run_tasks_orders_and_reports_failures():
    assert run_tasks(7, lambda i: i * i, workers=3) == [i * i for i in range(7)]
    with pytest.raises(RuntimeError, match=r"(?s)task 3.*KeyError: 'task three'"):
        run_tasks(6, _fail_on_three, workers=2)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        run_tasks(2, abs, workers=0)
    with pytest.raises(ValueError, match="torch.distributed process group"):
        run_tasks(2, abs, distributed=True)


def test_workers_give_the_single_process_rows(trained, digits):
    model, _ = trained
    _, test = digits
    one = evaluate_faults(model, test, [0.0, 0.1, 0.3], trials=3, progress=False)
    two = evaluate_faults(model, test, [0.0, 0.1, 0.3], trials=3, progress=False, workers=2)
    assert two.rows == one.rows
    assert len({r["acc"] for r in one.rows}) > 2  # the maps do differ
    v1 = evaluate_variability(model, test, [0.3], trials=3, progress=False)
    v2 = evaluate_variability(model, test, [0.3], trials=3, progress=False, workers=2)
    assert v2.rows == v1.rows


def test_workers_give_the_single_process_comparison(trained, digits):
    model, _ = trained
    train, test = digits
    small = torch.utils.data.Subset(train, range(128))
    cfg = CompareConfig(trials=2, finetune=TrainConfig(epochs=1, lr=0.005, lambda_rise_epochs=1),
                        selftune_on_top=False)
    kw = dict(scenario_list=scenarios(stuck=[0.2], ber=[0.05]),
              methods=["none", "nearest_valid", "paper"], config=cfg, progress=False)
    one = compare_methods(model, small, test, **kw)
    two = compare_methods(model, small, test, workers=2, **kw)
    assert two.rows == one.rows
    assert len(one.rows) == 3 + 2 * 3 + 2 * 1


# --------------------------------------------------------------- torch.distributed (gloo)


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                        nn.Linear(12, 3))
    # LSQ's grid: on the fitted default levels these rates rarely change a prediction of this
    # tiny net, and the rows must differ for the comparison to mean something.
    model = quantize_model(net, NMultConfig(weight_bits=3, act_bits=None, init="lsq")).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 4, 4, generator=g)
    y = model(x).argmax(1)  # labels the ideal model gets right: faults then cost accuracy
    return model, TensorDataset(x, y)


def _jobs(distributed: bool):
    model, data = _setup()
    kw = dict(trials=3, progress=False, distributed=distributed)
    return {"faults": evaluate_faults(model, data, [0.0, 0.2], layers="all", **kw).rows,
            "bitflips": evaluate_bitflips(model, data, [0.05], layers="all", **kw).rows}


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=WORLD)
    try:
        torch.save(_jobs(True), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_torch_distributed_ranks_give_the_single_process_rows(tmp_path, run_ranks):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    run_ranks(_rank, (str(tmp_path / "rendezvous"), str(tmp_path)), WORLD, TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _jobs(False)
    assert ranks[0] == ranks[1] == single
    assert len({r["acc"] for r in single["faults"]}) > 1
