"""Training of quantized models: the QAT loop and what it adds to the task loss.

A layer of its own between :mod:`qfv_brevitas.core` (levels, quantizers, the chip component,
which it trains) and :mod:`qfv_brevitas.chip` (whose repairs fine-tune through :func:`fit`):

- :mod:`~qfv_brevitas.training.train`: :func:`fit` (SGD + momentum, cosine decay, the
  regularizer's lambda schedule, optional SAM and level refits; a loss, optimizer factory and
  metrics of your own), :func:`evaluate`, :class:`TrainConfig`; for your own loop
  :func:`param_groups` and :func:`split_optimizers` (``r``/``c`` on their own optimizer);
- :mod:`~qfv_brevitas.training.regularizer`: the model-level regularizer of paper eq. 6/7;
- :mod:`~qfv_brevitas.training.sam`: sharpness-aware updates (FlatENN);
- :mod:`~qfv_brevitas.training.refit`: levels refitted in closed form to the current weights;
- :mod:`~qfv_brevitas.training.optim`: several optimizers stepped as one (for frameworks that
  take one optimizer);
- :mod:`~qfv_brevitas.training.lightning` (the ``lightning`` extra, imported only when asked
  for): the regularizer, its schedule and the refits as a PyTorch Lightning callback.
"""
from qfv_brevitas.training.refit import refit_levels_
from qfv_brevitas.training.regularizer import (LambdaSchedule, QuantRegularizer, layer_factor,
                                               regularization_loss)
from qfv_brevitas.training.sam import SharpnessAware, check_rho, sam_params
from qfv_brevitas.training.train import (TrainConfig, TrainingError, accuracy, evaluate,
                                         evaluate_metrics, fit, param_groups, split_optimizers)

__all__ = ["TrainConfig", "TrainingError", "fit", "evaluate", "param_groups", "split_optimizers",
           "accuracy", "evaluate_metrics", "layer_factor",
           "regularization_loss", "QuantRegularizer", "LambdaSchedule", "sam_params",
           "SharpnessAware", "check_rho", "refit_levels_"]
