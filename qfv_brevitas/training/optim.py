"""Several optimizers stepped as one: for a framework that takes a single optimizer (PyTorch
Lightning's automatic optimization, one LR scheduler) while ``r``/``c`` need their own
(:func:`qfv_brevitas.training.train.split_optimizers`)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from qfv_brevitas.util.errors import QfvError, QfvTypeError

__all__ = ["CombinedOptimizer"]


class CombinedOptimizer(torch.optim.Optimizer):
    """``optimizers`` behind one :class:`torch.optim.Optimizer`: ``step`` runs the closure once
    and then steps each; ``param_groups`` are theirs (the same dicts, so an LR scheduler of the
    combined optimizer sets their learning rates) and ``state`` is one dict they share (a
    framework that moves optimizer state to a device moves theirs). ``state_dict`` holds each
    optimizer's own state dict.

    >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    >>> opt = CombinedOptimizer([torch.optim.SGD([a], lr=0.1), torch.optim.Adam([b], lr=0.1)])
    >>> (2 * a.sum() + 2 * b.sum()).backward(); opt.step()    # SGD: lr * 2; Adam: lr
    >>> [round(v, 6) for v in a.tolist() + b.tolist()]
    [0.8, 0.8, 0.9, 0.9]
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        opts = list(optimizers)
        if not opts or not all(isinstance(o, torch.optim.Optimizer) for o in opts):
            raise QfvTypeError(f"CombinedOptimizer takes a non-empty list of torch optimizers, "
                               f"got {optimizers!r}")
        params = [p for o in opts for g in o.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise QfvError("CombinedOptimizer: a parameter is in two of the optimizers (it "
                           "would be stepped twice)")
        super().__init__(params, {})
        self.optimizers = opts
        self._link()

    def _link(self) -> None:
        """Share the optimizers' groups and one state dict (again after a load, which gives
        each optimizer new ones)."""
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        state: Dict[Any, Dict[str, Any]] = defaultdict(dict)
        for o in self.optimizers:
            state.update(o.state)
        for o in self.optimizers:
            o.state = state
        self.state = state

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Run ``closure`` (forward and backward) once, then step every optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        """``{"optimizers": [each optimizer's state dict]}`` (each packs only its own
        parameters' state out of the shared dict)."""
        out = []
        for o in self.optimizers:
            own = {id(p) for g in o.param_groups for p in g["params"]}
            o.state = defaultdict(dict, {p: s for p, s in self.state.items() if id(p) in own})
            try:
                out.append(o.state_dict())
            finally:
                o.state = self.state
        return {"optimizers": out}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved: List[Dict[str, Any]] = state_dict.get("optimizers", [])
        if len(saved) != len(self.optimizers):
            raise QfvError(f"CombinedOptimizer.load_state_dict: the state holds {len(saved)} "
                           f"optimizers, this one combines {len(self.optimizers)}")
        for o, sd in zip(self.optimizers, saved):
            o.load_state_dict(sd)
        self._link()
