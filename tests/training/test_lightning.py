"""``qfv_brevitas.training.lightning``: the regularizer, its lambda schedule and the level
refits added to a plain LightningModule by ``QfvCallback``, and ``qfv_optimizers``' split, with
a real Lightning ``Trainer`` on the CPU and small synthetic data."""
import copy
import csv

import pytest

pl = pytest.importorskip("lightning.pytorch")

import brevitas.nn as qnn  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import qfv_brevitas.training.lightning as qfv_lightning  # noqa: E402
from qfv_brevitas.core.config import LambdaSchedule  # noqa: E402
from qfv_brevitas.core.quantizers import NMultWeightQuant, quant_of  # noqa: E402
from qfv_brevitas.training.lightning import QfvCallback, qfv_optimizers  # noqa: E402
from qfv_brevitas.training.optim import CombinedOptimizer  # noqa: E402
from qfv_brevitas.training.regularizer import regularization_loss  # noqa: E402
from qfv_brevitas.training.train import TrainConfig  # noqa: E402
from qfv_brevitas.util.errors import QfvError  # noqa: E402

N_IN, HIDDEN, N_OUT, SAMPLES, BATCH = 16, 32, 4, 128, 16  # 8 batches per epoch


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        qnn.QuantLinear(N_IN, HIDDEN, bias=True, weight_quant=NMultWeightQuant,
                        weight_bit_width=2),
        nn.ReLU(),
        qnn.QuantLinear(HIDDEN, N_OUT, bias=True, weight_quant=NMultWeightQuant,
                        weight_bit_width=3))


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, N_IN, generator=g)
    y = (x @ torch.randn(N_IN, N_OUT, generator=g)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


class Classifier(pl.LightningModule):
    """A LightningModule as a user writes it: nothing of qfv_brevitas in its training step."""

    def __init__(self, net, cfg=None, manual=False):
        super().__init__()
        self.net, self.cfg = net, cfg or TrainConfig(lr=0.05, quant_lr=1e-3)
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("task_loss", loss)
        return loss

    def configure_optimizers(self):
        return qfv_optimizers(self, self.cfg)


def _trainer(callbacks=(), epochs=3, **kw):
    base = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    return pl.Trainer(callbacks=list(callbacks), **{**base, **kw})


def _distance(net):
    return float(regularization_loss(net).detach())


def test_the_regularizer_pulls_the_weights_onto_their_levels():
    """The same run with and without the callback (no refits: the regularizer alone): the
    weights end far closer to their levels with it; the module's training_step is its own
    again after the fit."""
    start = _net()
    d0 = _distance(start)
    with_cb, without = Classifier(copy.deepcopy(start)), Classifier(copy.deepcopy(start))
    cb = QfvCallback(LambdaSchedule(total_epochs=3, start=100, end=100, rise_epochs=0),
                     refit_every=0)
    _trainer([cb]).fit(with_cb, _loader())
    _trainer().fit(without, _loader())
    d_with, d_without = _distance(with_cb.net), _distance(without.net)
    assert d_with < 0.2 * d_without, (d0, d_with, d_without)
    assert d_with < 0.2 * d0
    assert "training_step" not in with_cb.__dict__
    assert cb.refits == 0


def test_lambda_follows_the_schedule_per_epoch_and_is_logged(tmp_path):
    schedule = LambdaSchedule(total_epochs=3, start=10, end=1000, rise_epochs=2)
    cb = QfvCallback(schedule, refit_every=0)
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    _trainer([cb], logger=logger, log_every_n_steps=1).fit(Classifier(_net()), _loader())
    assert cb.lambdas == {0: 10.0, 1: 100.0, 2: 1000.0}
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lam = {int(r["epoch"]): float(r["qfv/lambda"]) for r in rows if r.get("qfv/lambda")}
    assert lam == {0: 10.0, 1: pytest.approx(100.0), 2: 1000.0}
    regs = [float(r["qfv/reg_epoch"]) for r in rows if r.get("qfv/reg_epoch")]
    assert len(regs) == 3 and regs[-1] < regs[0]  # the pull grows with lambda
    assert sum(1 for r in rows if r.get("qfv/reg_step")) == 3 * SAMPLES // BATCH


@pytest.mark.parametrize("accumulate,expected", [(1, 12), (2, 6)])
def test_the_levels_are_refitted_every_refit_every_optimizer_steps(monkeypatch, accumulate,
                                                                   expected):
    """24 batches over 3 epochs: with ``refit_every=2`` a refit after optimizer steps 2, 4,
    ...; with two batches accumulated per step, half as many. Each refit lowers (never raises)
    the levels' squared error to the weights."""
    calls = []
    real = qfv_lightning.refit_levels_

    def spy(model, warm=False, **kw):
        rows = real(model, warm=warm, **kw)
        calls.append((model.trainer.global_step, warm, rows))
        return rows

    monkeypatch.setattr(qfv_lightning, "refit_levels_", spy)
    cb = QfvCallback(LambdaSchedule(total_epochs=3, rise_epochs=0), refit_every=2)
    _trainer([cb], accumulate_grad_batches=accumulate).fit(Classifier(_net()), _loader())
    assert cb.refits == expected
    assert [s for s, _, _ in calls] == list(range(2, 2 * expected + 1, 2))
    assert all(warm for _, warm, _ in calls)
    rows = [r for _, _, rs in calls for r in rs]
    assert len(rows) == 2 * expected
    assert all(r["error_after"] <= r["error_before"] * (1 + 1e-6) for r in rows)
    assert any(r["error_after"] < r["error_before"] * 0.999 for r in rows)


def test_qfv_optimizers_keep_r_and_c_on_their_own_optimizer():
    """One combined optimizer for Lightning: SGD + momentum on the weights and biases, Adam on
    every r and c at quant_lr, both stepped (their state exists), one cosine decay per step."""
    module = Classifier(_net(), TrainConfig(lr=0.05, quant_lr=1e-3, weight_decay=0.0))
    r0 = quant_of(module.net[0]).r.detach().clone()
    _trainer([QfvCallback(LambdaSchedule(total_epochs=3, rise_epochs=0), refit_every=0)]
             ).fit(module, _loader())
    (opt,) = [getattr(o, "_optimizer", o) for o in module.trainer.optimizers]
    assert isinstance(opt, CombinedOptimizer)
    sgd, adam = opt.optimizers
    assert type(sgd) is torch.optim.SGD and type(adam) is torch.optim.Adam
    quant = {id(p) for l in (module.net[0], module.net[2]) for p in (quant_of(l).r, quant_of(l).c)}
    assert {id(p) for g in adam.param_groups for p in g["params"]} == quant
    assert all(g["initial_lr"] == 1e-3 for g in adam.param_groups)
    assert all(g["initial_lr"] == 0.05 and g["momentum"] == 0.9 for g in sgd.param_groups)
    assert all("exp_avg" in adam.state[p] for g in adam.param_groups for p in g["params"])
    assert all("momentum_buffer" in sgd.state[p] for g in sgd.param_groups
               for p in g["params"])
    assert all(g["lr"] < 1e-3 * g["initial_lr"] for g in opt.param_groups)  # cosine at its end
    assert not torch.equal(quant_of(module.net[0]).r, r0)


def test_manual_optimization_adds_the_term_itself():
    """A manually optimized module is refused with add_to_loss=True (the returned loss is not
    what it backpropagates) and works with loss_term added by the module."""

    class Manual(Classifier):
        def __init__(self, net, cb):
            super().__init__(net, manual=True)
            self.cb = cb

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y) + self.cb.loss_term(self)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    sched = LambdaSchedule(total_epochs=3, start=100, end=100, rise_epochs=0)
    with pytest.raises(QfvError, match="add_to_loss=False"):
        bad = QfvCallback(sched, refit_every=0)
        _trainer([bad]).fit(Manual(_net(), bad), _loader())
    cb = QfvCallback(sched, refit_every=0, add_to_loss=False)
    module = Manual(_net(), cb)
    d0 = _distance(module.net)
    _trainer([cb]).fit(module, _loader())
    assert cb.lambdas == {0: 100.0, 1: 100.0, 2: 100.0}
    assert _distance(module.net) < 0.2 * d0


def test_bad_setups_are_refused():
    with pytest.raises(QfvError, match="no N-multiplier layers"):
        float_module = Classifier(nn.Sequential(nn.Linear(N_IN, N_OUT)))
        _trainer([QfvCallback(LambdaSchedule(total_epochs=3, rise_epochs=0))]).fit(
            float_module, _loader())
    with pytest.raises(QfvError, match="covers 2 epochs"):
        _trainer([QfvCallback(LambdaSchedule(total_epochs=2, rise_epochs=0))]).fit(
            Classifier(_net()), _loader())
    with pytest.raises(QfvError, match="refit_every"):
        QfvCallback(refit_every=-1)
