"""Language-model loss and bits per byte."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qfv_brevitas.training.lm import bits_per_byte, evaluate_bpb, lm_loss, logits_of
from qfv_brevitas.util.errors import QfvError


def test_bits_per_byte_is_the_cross_entropy_in_bits():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 256)
    y = torch.randint(0, 256, (3, 5))
    logp = torch.log_softmax(logits, -1).gather(-1, y[..., None])
    assert float(bits_per_byte(logits, y)) == pytest.approx(float(-logp.mean() / math.log(2)),
                                                            rel=1e-6)
    assert float(bits_per_byte(torch.zeros(1, 4, 256), y[:1, :4])) == pytest.approx(8.0)
    sure = torch.full((1, 4, 256), -30.0).scatter(-1, y[:1, :4, None], 30.0)
    assert float(bits_per_byte(sure, y[:1, :4])) < 1e-6


def test_outputs_with_logits_and_shape_errors():
    t = torch.zeros(2, 3, 7)
    assert logits_of(SimpleNamespace(logits=t)) is t and logits_of({"logits": t}) is t
    with pytest.raises(QfvError, match="carry .logits"):
        logits_of(SimpleNamespace(hidden=t))
    with pytest.raises(QfvError, match="do not match"):
        lm_loss(t, torch.zeros(2, 4, dtype=torch.long))


def test_evaluate_bpb_averages_over_every_byte():
    class Table(nn.Module):  # predicts byte b+1 after byte b with probability 1/2
        def forward(self, ids):
            out = torch.full((*ids.shape, 256), -1e9)
            out.scatter_(-1, (ids[..., None] + 1) % 256, 0.0)
            out.scatter_(-1, (ids[..., None] + 2) % 256, 0.0)
            return out

    x = torch.randint(0, 256, (10, 8))
    data = TensorDataset(x, (x + 1) % 256)
    assert evaluate_bpb(Table(), data, batch_size=3) == pytest.approx(1.0)
    data = TensorDataset(x, (x + 3) % 256)  # a byte it gives no probability: huge
    assert evaluate_bpb(Table(), data, batch_size=3) > 1e8
