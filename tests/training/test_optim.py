"""``qfv_brevitas.training.optim.CombinedOptimizer``: several optimizers as one, against the
same optimizers stepped by hand."""
import copy

import pytest
import torch

from qfv_brevitas.training.optim import CombinedOptimizer
from qfv_brevitas.util.errors import QfvError


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, generator=g)) for _ in range(2)]


def _pair(a, b):
    return [torch.optim.SGD([a], lr=0.1, momentum=0.9), torch.optim.Adam([b], lr=0.05)]


def _loss(a, b, t):
    return ((a - t) ** 2).sum() + ((b + t) ** 3).abs().sum()


def _run(opt_step, a, b, steps, start=0):
    for t in range(start, start + steps):
        opt_step(_loss(a, b, float(t)))


def test_steps_and_schedules_like_its_optimizers_by_hand():
    """Five steps with a cosine decay on the combined optimizer equal both optimizers stepped
    by hand with the same decay on each: the scheduler reaches the inner groups."""
    a, b = _params()
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    combined = CombinedOptimizer(_pair(a, b))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(combined, T_max=5)
    hand = _pair(a2, b2)
    hand_sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5) for o in hand]

    def step_combined(loss):
        combined.zero_grad()
        loss.backward()
        combined.step()
        sched.step()

    def step_hand(loss):
        for o in hand:
            o.zero_grad()
        loss.backward()
        for o, s in zip(hand, hand_sched):
            o.step()
            s.step()

    _run(step_combined, a, b, 5)
    _run(step_hand, a2, b2, 5)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    torch.testing.assert_close(b, b2, rtol=0, atol=0)
    assert [g["lr"] for g in combined.param_groups] == [g["lr"] for o in hand
                                                       for g in o.param_groups]
    # the state is the inner optimizers' (momentum of SGD, moments of Adam), one shared dict
    assert set(combined.state[a]) == {"momentum_buffer"}
    assert {"exp_avg", "exp_avg_sq"} <= set(combined.state[b])


def test_step_runs_the_closure_once():
    a, b = _params()
    combined = CombinedOptimizer(_pair(a, b))
    calls = []

    def closure():
        calls.append(1)
        combined.zero_grad()
        loss = _loss(a, b, 1.0)
        loss.backward()
        return loss

    before = a.detach().clone()
    loss = combined.step(closure)
    assert len(calls) == 1 and float(loss) > 0 and not torch.equal(a, before)


def test_state_dict_round_trip_continues_the_same_run():
    a, b = _params()
    combined = CombinedOptimizer(_pair(a, b))

    def step(opt, a, b):
        def f(loss):
            opt.zero_grad()
            loss.backward()
            opt.step()
        return f

    _run(step(combined, a, b), a, b, 3)
    saved = copy.deepcopy(combined.state_dict())
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    other = CombinedOptimizer(_pair(a2, b2))
    other.load_state_dict(saved)
    assert set(other.state) == {a2, b2}  # relinked to the loaded inner states
    _run(step(combined, a, b), a, b, 3, start=3)
    _run(step(other, a2, b2), a2, b2, 3, start=3)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    torch.testing.assert_close(b, b2, rtol=0, atol=0)
    with pytest.raises(QfvError, match="holds 1 optimizers"):
        other.load_state_dict({"optimizers": saved["optimizers"][:1]})


def test_refuses_a_parameter_in_two_optimizers_and_non_optimizers():
    a, _ = _params()
    with pytest.raises(QfvError, match="two of the optimizers"):
        CombinedOptimizer([torch.optim.SGD([a], lr=0.1), torch.optim.Adam([a])])
    with pytest.raises(QfvError, match="list of torch optimizers"):
        CombinedOptimizer([])
