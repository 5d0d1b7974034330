"""The seed papers' methods side by side on the same model, data and maps.

:func:`compare_methods` runs a chosen set of methods over a list of :class:`Scenario` s (stuck-at
faults, transient bit flips, per-cell variability: normal or lognormal, with HRS leakage, with or
without a between-chip component) and ``trials`` seeded maps per scenario: trial ``k`` draws its
map (or flip stream) from seed ``seed + k`` for every method, so the methods are compared on the
same chips. It returns a :class:`~qfv_brevitas.studies.results.StudyResult` comparison: one
table (mean, std, min over the maps) and one plot.

The methods are those of the registry (:mod:`qfv_brevitas.studies.methods`, which lists the
library's own): a method that does not apply to a scenario's kind (one that adapts to a map,
under transient bit flips) is ``n/a`` there. Methods trained once are trained from the model
before any map is drawn and deployed naively, like ``none``. With
``CompareConfig.selftune_on_top`` every method is also reported after self-tuning
(``<method>+selftune``). All fine-tunes use ``CompareConfig.finetune``. The runner is
:func:`qfv_brevitas.studies.engine.run_study`.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn
from torch.utils.data import Dataset

from qfv_brevitas.studies.engine import CompareConfig, run_study
from qfv_brevitas.studies.methods import METHODS
from qfv_brevitas.studies.results import StudyResult
from qfv_brevitas.studies.scenario import Scenario

__all__ = ["compare_methods"]


def compare_methods(model: nn.Module, train: Dataset, test: Dataset,
                    scenario_list: Sequence[Scenario], methods: Sequence[str] = METHODS,
                    config: Optional[CompareConfig] = None, progress: bool = True,
                    workers: int = 1, distributed: bool = False, device=None
                    ) -> StudyResult:
    """Run ``methods`` on ``model`` over each scenario's ``config.trials`` seeded maps and
    collect test accuracies (``model`` itself is left unchanged: every run is on a copy).
    ``workers`` processes and/or the ranks of a ``torch.distributed`` group
    (``distributed=True``) share the maps (:mod:`qfv_brevitas.util.parallel`: the same rows as one
    process); ``device`` runs on a copy of the model there.

    Raises ValueError for an unknown method or scenario, or a model without N-multiplier
    layers. See the module docstring for the methods.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from qfv_brevitas import NMultConfig, quantize_model
    >>> torch.manual_seed(0) and None
    >>> m = quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(),
    ...                                  nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
    ...                    NMultConfig(act_bits=None))
    >>> data = TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 2, (32,)))
    >>> res = compare_methods(m, data, data, [Scenario("faults", 0.2)], ["none", "nearest_valid"],
    ...                       CompareConfig(trials=2, selftune_on_top=False), progress=False)
    >>> res.scenario_labels, res.methods, len(res.rows)
    (['ideal device', 'stuck-at 20%'], ['none', 'nearest_valid'], 6)
    """
    return run_study(model, train, test, scenario_list, methods, config, progress=progress,
                     workers=workers, distributed=distributed, device=device)
