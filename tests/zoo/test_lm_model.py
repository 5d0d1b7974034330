"""The project's small transformer."""
import pytest
import torch

from qfv_brevitas.util.errors import QfvError
from qfv_brevitas.zoo.lm import TinyLM, sinusoids
from qfv_brevitas.zoo.models import build_model


def test_causal_and_shapes():
    torch.manual_seed(0)
    m = TinyLM(dim=32, layers=2, heads=4, context=16).eval()
    x = torch.randint(0, 256, (2, 12))
    out = m(x)
    assert out.shape == (2, 12, 256)
    x2 = x.clone()
    x2[:, 7] = (x2[:, 7] + 1) % 256
    out2 = m(x2)
    assert torch.equal(out[:, :7], out2[:, :7])          # the past does not see the future
    assert not torch.allclose(out[:, 7:], out2[:, 7:])
    with pytest.raises(QfvError, match="time <= 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_layers_and_ties():
    m = TinyLM(dim=32, layers=2, heads=2, context=8, tie_weights=True)
    assert m.lm_head.weight is m.embed.weight
    names = [n for n, l in m.named_modules() if isinstance(l, (torch.nn.Linear, torch.nn.Embedding))]
    assert names[0] == "embed" and names[-1] == "lm_head" and len(names) == 2 + 2 * 6
    assert not any(isinstance(b, torch.nn.Parameter) for b in m.buffers())
    assert "positions" not in m.state_dict()
    with pytest.raises(QfvError, match="multiple of heads"):
        TinyLM(dim=30, heads=4)


def test_sinusoids_and_registry():
    p = sinusoids(10, 8)
    assert torch.allclose(p[:, 0], torch.sin(torch.arange(10.0)))
    assert torch.allclose(p[:, 1], torch.cos(torch.arange(10.0)))
    m = build_model("tiny_lm", (24,), 256)
    assert isinstance(m, TinyLM) and m.context == 24
    with pytest.raises(QfvError, match="token sequences"):
        build_model("tiny_lm", (1, 8, 8), 10)
