"""``qfv_brevitas.training.train.fit``: what one run of it does, step by step, against a reference
loop written here from its contract (SGD + momentum on the weights with weight decay on matrices
only; Adam, or SGD, on ``r``/``c`` at ``quant_lr`` without weight decay; cosine decay over all
steps; ``loss = CE + lambda(epoch) * alpha * sum_i min_q (w_i - q)^2`` with the scheduled
lambda). The reference computes the regularizer by brute force over the level table, not with
the library's search."""
import copy
import math

import brevitas.nn as qnn
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qfv_brevitas.core.levels import bit_matrix
from qfv_brevitas.core.quantizers import NMultWeightQuant, quant_of
from qfv_brevitas.training.train import TrainConfig, accuracy, evaluate, evaluate_metrics, fit

BITS = 3
N_IN, N_OUT, SAMPLES = 8, 4, 16
# LambdaSchedule(total_epochs=4, start=100, end=2000, rise_epochs=2): held, held, then the
# exponential rise 100 * 20**(1/2), and the last epoch at ``end``.
LAMBDAS = [100.0, 100.0, 100.0 * 20 ** 0.5, 2000.0]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(qnn.QuantLinear(N_IN, N_OUT, bias=True, weight_quant=NMultWeightQuant,
                                         weight_bit_width=BITS))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, N_IN, generator=g)
    y = torch.randint(0, N_OUT, (SAMPLES,), generator=g)
    return TensorDataset(x, y)


def _brute_reg(layer):
    """``alpha * sum_i min_k (w_i - level_k)^2``, all levels enumerated (differentiable in w,
    r and c through the selected level)."""
    tq = quant_of(layer)
    levels = tq.c[0] + bit_matrix(BITS) @ tq.r[0]  # (2**N,) indexed by code
    d2 = (layer.weight.reshape(-1, 1) - levels[None, :]) ** 2
    alpha = 1.0 / math.sqrt(layer.weight.numel() * (2 ** (BITS - 1) - 1))
    return alpha * d2.min(dim=1).values.sum()


def _reference(model, data, cfg, lambdas, quant_decay=0.0, batches=1, period=None):
    """``batches`` full-batch steps per epoch, written out (for ``batches > 1`` every sample
    must be the same, so that any batch is the full batch): returns the trained copy and the
    unweighted regularizer of each epoch's first step. ``quant_decay``: weight decay on r/c,
    ``period``: steps of the cosine's half period (default all steps; both for the rivals)."""
    model = copy.deepcopy(model)
    layer = model[0]
    tq = quant_of(layer)
    w_opt = torch.optim.SGD([{"params": [layer.weight], "weight_decay": cfg.weight_decay},
                             {"params": [layer.bias], "weight_decay": 0.0}],
                            lr=cfg.lr, momentum=cfg.momentum)
    if cfg.quant_optimizer == "adam":
        q_opt = torch.optim.Adam([tq.r, tq.c], lr=cfg.quant_lr, weight_decay=quant_decay)
    else:
        q_opt = torch.optim.SGD([tq.r, tq.c], lr=cfg.quant_lr, momentum=cfg.momentum,
                                weight_decay=quant_decay)
    x, y = data.tensors
    regs = []
    steps = len(lambdas) * batches
    for t in range(steps):
        lam = lambdas[t // batches]
        cosine = (1 + math.cos(math.pi * t / (period or steps))) / 2
        for opt, base in ((w_opt, cfg.lr), (q_opt, cfg.quant_lr)):
            for grp in opt.param_groups:
                grp["lr"] = base * cosine
        reg = _brute_reg(layer)
        loss = nn.functional.cross_entropy(model(x), y) + lam * reg
        w_opt.zero_grad()
        q_opt.zero_grad()
        loss.backward()
        w_opt.step()
        q_opt.step()
        if t % batches == 0:
            regs.append(float(reg.detach()))
    return model, regs


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# fit and the reference agree to ~2e-7 (relative; the shuffled batch sums in another order);
# the rival rules below end >= 1e-3 (relative) away.
def _assert_same(a, b, what):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-5, atol=1e-7,
                                   msg=lambda m: f"{what} {k}: {m}")


def _differs(a, b):
    return any(not torch.allclose(a[k], b[k], rtol=3e-4, atol=1e-6) for k in a)


@pytest.mark.parametrize("quant_optimizer,quant_lr", [("adam", 0.01), ("sgd", 0.001)])
def test_fit_is_the_reference_loop_step_by_step(quant_optimizer, quant_lr):
    # weight_decay is large so that decaying r/c (or not decaying the weight) shows; quant_lr
    # is large so that r/c move visibly, yet small enough for SGD to stay stable.
    cfg = TrainConfig(epochs=4, lr=0.002, quant_lr=quant_lr, quant_optimizer=quant_optimizer,
                      weight_decay=0.5, batch_size=SAMPLES, lambda_rise_epochs=2)
    model, data = _model(), _data()
    start = _params(model)
    ref, ref_regs = _reference(model, data, cfg, LAMBDAS)
    hist = fit(model, data, None, cfg, progress=False)
    got = _params(model)
    _assert_same(got, _params(ref), f"fit vs the reference ({quant_optimizer})")
    # r and c did move (their optimizer was built and stepped), by more than the tolerance
    for k in ("0.weight_quant.tensor_quant.r", "0.weight_quant.tensor_quant.c"):
        assert (got[k] - start[k]).abs().max() > 1e-3, k
    assert hist["lambda"] == pytest.approx(LAMBDAS, rel=1e-12)
    assert hist["reg"] == pytest.approx(ref_regs, rel=1e-4)
    # The reference is sensitive to what this test claims to check: each of these other
    # training rules ends somewhere else.
    other = "sgd" if quant_optimizer == "adam" else "adam"
    rivals = {
        "lambda held at its first value": (cfg, [LAMBDAS[0]] * 4),
        f"{other} for r/c": (TrainConfig(**{**cfg.__dict__, "quant_optimizer": other}), LAMBDAS),
        "no update of r/c": (TrainConfig(**{**cfg.__dict__, "quant_lr": 0.0}), LAMBDAS),
    }
    for what, (rcfg, lams) in rivals.items():
        assert _differs(_params(_reference(_model(), data, rcfg, lams)[0]), got), what
    decayed = _reference(_model(), data, cfg, LAMBDAS, quant_decay=cfg.weight_decay)[0]
    assert _differs(_params(decayed), got), "weight decay on r/c"


def test_cosine_decay_runs_over_every_step_of_every_epoch():
    """Two batches per epoch (all samples alike, so any batch is the full batch): the learning
    rates follow one cosine over all 8 steps, not over the 4 epochs."""
    cfg = TrainConfig(epochs=4, lr=0.002, quant_lr=0.01, weight_decay=0.5,
                      batch_size=SAMPLES // 2, lambda_rise_epochs=2)
    x, y = _data().tensors
    data = TensorDataset(x[:1].repeat(SAMPLES, 1), y[:1].repeat(SAMPLES))
    model = _model()
    ref = _params(_reference(model, data, cfg, LAMBDAS, batches=2)[0])
    fit(model, data, None, cfg, progress=False)
    _assert_same(_params(model), ref, "fit vs the reference (2 batches per epoch)")
    # a cosine over the 4 epochs, stepped every batch, ends elsewhere
    per_epoch = _reference(_model(), data, cfg, LAMBDAS, batches=2, period=len(LAMBDAS))[0]
    assert _differs(_params(per_epoch), ref)


def test_weight_decay_reaches_weight_matrices_only():
    """With zero learning rate for r/c and lambda 0, one SGD step moves the weight matrix by
    ``lr * (grad + wd * w)`` and the bias and r/c by the plain gradient step (nothing)."""
    cfg = TrainConfig(epochs=1, lr=0.1, quant_lr=0.0, weight_decay=0.5, batch_size=SAMPLES,
                      lambda_start=0.0, lambda_end=0.0, lambda_rise_epochs=0)
    model, data = _model(), _data()
    probe = copy.deepcopy(model)
    x, y = data.tensors
    nn.functional.cross_entropy(probe(x), y).backward()
    w, b = probe[0].weight, probe[0].bias
    hist = fit(model, data, None, cfg, progress=False)
    torch.testing.assert_close(model[0].weight.detach(), (w - 0.1 * (w.grad + 0.5 * w)).detach(),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model[0].bias.detach(), (b - 0.1 * b.grad).detach(),
                               rtol=1e-5, atol=1e-7)
    tq, tq0 = quant_of(model[0]), quant_of(probe[0])
    assert torch.equal(tq.r, tq0.r) and torch.equal(tq.c, tq0.c)
    # lambda 0: nothing applied, and the unweighted regularizer still logged
    assert hist["lambda"] == [0.0]
    assert hist["reg"][0] == pytest.approx(float(_brute_reg(probe[0])), rel=1e-5)


# -- a loss, an optimizer factory and metrics of the user's own (issue 23) ------------------------
def _one_step_cfg(**kw):
    """One full-batch SGD step (momentum has no history yet; the cosine starts at lr)."""
    base = dict(epochs=1, lr=0.1, quant_lr=0.0, weight_decay=0.5, batch_size=SAMPLES,
                lambda_start=0.0, lambda_end=0.0, lambda_rise_epochs=0, refit_every=0)
    return TrainConfig(**{**base, **kw})


def test_a_custom_loss_is_the_one_fit_trains_with():
    """MSE on one-hot targets instead of cross-entropy: called once per batch (and by nothing
    else), its value is the history's task loss, and the step is its gradient's step."""
    cfg = _one_step_cfg()
    model, data = _model(), _data()
    x, y = data.tensors
    probe = copy.deepcopy(model)
    mse = nn.functional.mse_loss(probe(x), nn.functional.one_hot(y, N_OUT).float())
    mse.backward()
    w = probe[0].weight
    calls = []

    def one_hot_mse(out, target):
        calls.append(out.shape)
        return nn.functional.mse_loss(out, nn.functional.one_hot(target, N_OUT).float())

    hist = fit(model, data, None, cfg, progress=False, loss_fn=one_hot_mse)
    assert calls == [(SAMPLES, N_OUT)]
    assert hist["task_loss"] == [pytest.approx(float(mse), rel=1e-6)]
    torch.testing.assert_close(model[0].weight.detach(), (w - 0.1 * (w.grad + 0.5 * w)).detach(),
                               rtol=1e-5, atol=1e-7)
    # cross-entropy (the default) ends elsewhere: the loss passed changed training
    default = _model()
    fit(default, data, None, cfg, progress=False)
    assert not torch.allclose(default[0].weight, model[0].weight, rtol=1e-3, atol=1e-5)


def test_the_optimizer_factory_gets_the_split_groups_with_their_learning_rates():
    """The factory receives the weights, biases and r/c in separate named groups, r/c with
    their own lr (quant_lr) and no weight decay, the others taking the optimizer's; the
    optimizer it returns (one SGD over the groups) is the one stepped: r/c move at quant_lr,
    the weights at the SGD's lr."""
    lam = 100.0
    cfg = _one_step_cfg(lr=0.3, quant_lr=0.01, lambda_start=lam, lambda_end=lam)  # lr unused
    model, data = _model(), _data()
    layer, tq = model[0], quant_of(model[0])
    probe = copy.deepcopy(model)
    x, y = data.tensors
    (nn.functional.cross_entropy(probe(x), y) + lam * _brute_reg(probe[0])).backward()
    seen = []

    def factory(groups):
        seen.extend(dict(g) for g in groups)  # as given (the cosine then lowers each lr)
        return torch.optim.SGD(groups, lr=0.1)

    fit(model, data, None, cfg, progress=False, optimizer=factory)
    by_name = {g["name"]: g for g in seen}
    assert list(by_name) == ["weights", "no_decay", "quant"]
    assert by_name["weights"]["params"] == [layer.weight]
    assert by_name["no_decay"]["params"] == [layer.bias]
    assert [id(p) for p in by_name["quant"]["params"]] == [id(tq.r), id(tq.c)]
    assert by_name["quant"]["quant"] is True and by_name["quant"]["weight_decay"] == 0.0
    assert by_name["quant"]["lr"] == 0.01
    assert "lr" not in by_name["weights"] and "lr" not in by_name["no_decay"]
    assert by_name["weights"]["weight_decay"] == 0.5 and by_name["no_decay"]["weight_decay"] == 0
    pw, pb, ptq = probe[0].weight, probe[0].bias, quant_of(probe[0])
    for got, want in ((layer.weight, pw - 0.1 * (pw.grad + 0.5 * pw)),
                      (layer.bias, pb - 0.1 * pb.grad),
                      (tq.r, ptq.r - 0.01 * ptq.r.grad), (tq.c, ptq.c - 0.01 * ptq.c.grad)):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-7)
    assert (tq.r - ptq.r).abs().max() > 1e-4  # r did move


def test_an_optimizer_factory_that_returns_no_optimizer_is_refused():
    from qfv_brevitas.util.errors import QfvTypeError
    with pytest.raises(QfvTypeError, match="optimizer= must return a torch optimizer"):
        fit(_model(), _data(), None, _one_step_cfg(), progress=False, optimizer=lambda g: [g])


def test_metrics_are_in_the_history_as_computed_by_hand():
    """Each metric after each epoch, on the test set in eval mode, as ``test_<name>``; the last
    epoch's values equal a hand computation on the trained model; without a test set NaN."""
    cfg = _one_step_cfg(epochs=2, lr=0.5)
    model, data = _model(), _data()
    g = torch.Generator().manual_seed(7)
    tx, ty = torch.randn(10, N_IN, generator=g), torch.randint(0, N_OUT, (10,), generator=g)

    def top2(out, target):
        return float((out.topk(2, 1).indices == target[:, None]).any(1).float().mean())

    metrics = {"acc": accuracy, "top2": top2, "ce": nn.functional.cross_entropy}
    hist = fit(model, data, TensorDataset(tx, ty), cfg, progress=False, metrics=metrics)
    assert list(hist) == ["task_loss", "reg", "lambda", "test_acc", "test_top2", "test_ce"]
    assert all(len(v) == 2 for v in hist.values())
    model.eval()
    with torch.no_grad():
        out = model(tx)
    assert hist["test_acc"][-1] == pytest.approx(float((out.argmax(1) == ty).float().mean()))
    top = out.topk(2, 1).indices
    assert hist["test_top2"][-1] == pytest.approx(
        sum(int(ty[i]) in top[i].tolist() for i in range(10)) / 10)
    assert hist["test_ce"][-1] == pytest.approx(float(nn.functional.cross_entropy(out, ty)),
                                                rel=1e-6)
    assert hist["test_top2"][-1] != hist["test_acc"][-1] or hist["test_acc"][-1] == 1.0
    none = fit(_model(), data, None, cfg, progress=False, metrics={"top2": top2})
    assert list(none) == ["task_loss", "reg", "lambda", "test_top2"]
    assert all(math.isnan(v) for v in none["test_top2"])


def test_default_history_is_unchanged():
    hist = fit(_model(), _data(), _data(), _one_step_cfg(), progress=False)
    assert list(hist) == ["task_loss", "reg", "lambda", "test_acc"]
    assert hist["test_acc"] == [evaluate(_trained_once(), _data())]


def _trained_once():
    model = _model()
    fit(model, _data(), None, _one_step_cfg(), progress=False)
    return model


def test_evaluate_metrics_weights_each_batch_by_its_size():
    """Batches of 4, 4 and 2: a mean over samples, not over batches."""
    model = nn.Linear(N_IN, N_OUT)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, N_IN, generator=g), torch.randint(0, N_OUT, (10,), generator=g)
    got = evaluate_metrics(model, TensorDataset(x, y), {"ce": nn.functional.cross_entropy,
                                                        "acc": accuracy}, batch_size=4)
    with torch.no_grad():
        out = model(x)
    assert got["ce"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-6)
    assert got["acc"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    with pytest.raises(ValueError, match="metrics"):
        evaluate_metrics(model, TensorDataset(x, y), {"x": 3})
