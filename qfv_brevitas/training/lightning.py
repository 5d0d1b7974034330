"""PyTorch Lightning integration (the ``lightning`` extra): what :func:`~qfv_brevitas.fit` adds to a
training loop, for any ``LightningModule`` whose model has N-multiplier layers.

- :class:`QfvCallback`: the regularizer ``lambda(epoch) * R(model)`` added to the loss
  ``training_step`` returns, lambda from a :class:`~qfv_brevitas.core.config.LambdaSchedule` per
  epoch, the levels refitted every ``refit_every`` optimizer steps, and ``qfv/reg`` and
  ``qfv/lambda`` logged with ``pl_module.log``;
- :func:`qfv_optimizers`: ``configure_optimizers``' return value with ``r``/``c`` on their own
  optimizer (one SGD over all parameters diverged), combined into one optimizer for Lightning's
  automatic optimization, with a cosine decay per step.

Import it as ``qfv_brevitas.training.lightning``; ``import qfv_brevitas`` does not load Lightning.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from qfv_brevitas.core.config import LambdaSchedule
from qfv_brevitas.core.distance import DEFAULT_WIDTH
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.training.optim import CombinedOptimizer
from qfv_brevitas.training.refit import refit_levels_
from qfv_brevitas.training.regularizer import QuantRegularizer
from qfv_brevitas.training.train import TrainConfig, param_groups, split_optimizers
from qfv_brevitas.util.errors import QfvError

__all__ = ["QfvCallback", "qfv_optimizers"]


def qfv_optimizers(module: torch.nn.Module, cfg: Optional[TrainConfig] = None,
                   total_steps: Optional[int] = None) -> Dict[str, Any]:
    """What ``configure_optimizers`` returns for a quantized model: :func:`split_optimizers`
    over :func:`param_groups` (SGD + momentum on the weights at ``cfg.lr``, Adam on ``r``/``c``
    at ``cfg.quant_lr``; ``cfg`` default ``TrainConfig()``) as one
    :class:`~qfv_brevitas.training.optim.CombinedOptimizer` (Lightning's automatic optimization
    takes one optimizer), and one cosine decay stepped every optimizer step over
    ``total_steps`` (default the trainer's ``estimated_stepping_batches``), as :func:`fit`.

    >>> def configure_optimizers(self):                        # in your LightningModule
    ...     return qfv_optimizers(self, TrainConfig(lr=0.05))
    """
    cfg = TrainConfig() if cfg is None else cfg
    opt = CombinedOptimizer(split_optimizers(param_groups(module, cfg), cfg))
    if total_steps is None:
        trainer = getattr(module, "trainer", None) if isinstance(module, pl.LightningModule) \
            else None
        if trainer is None:
            raise QfvError("qfv_optimizers: give total_steps= (the module is not attached to "
                           "a Trainer)")
        total_steps = int(trainer.estimated_stepping_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(total_steps), 1))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RegularizedStep:
    """A module's ``training_step`` with the callback's term added to the loss it returns
    (installed on the module instance by :class:`QfvCallback` for one ``fit``)."""

    def __init__(self, callback: "QfvCallback", module: pl.LightningModule, step: Any):
        self.callback, self.module, self.step = callback, module, step

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.step(*args, **kwargs)
        if out is None:  # the module skips this batch
            return None
        term = self.callback.loss_term(self.module)
        if isinstance(out, Tensor):
            return out + term
        if isinstance(out, Mapping) and "loss" in out:
            return {**out, "loss": out["loss"] + term}
        raise QfvError(f"QfvCallback: training_step returned {type(out).__name__}; return the "
                       f"loss (a tensor or a dict with 'loss') or add callback.loss_term(self) "
                       f"yourself with QfvCallback(add_to_loss=False)")


class QfvCallback(pl.Callback):
    """The regularizer with its lambda schedule and the level refits, for any LightningModule.

    Add it to the ``Trainer``'s callbacks; the module's ``training_step`` stays as it is. While
    ``trainer.fit`` runs, the loss ``training_step`` returns gets ``lambda(epoch) * R(model)``
    (:class:`~qfv_brevitas.training.regularizer.QuantRegularizer`, ``lambda`` from ``schedule``
    at ``trainer.current_epoch``); every ``refit_every`` optimizer steps the levels are
    refitted to the weights (:func:`~qfv_brevitas.training.refit.refit_levels_`, ``warm=True``,
    as :func:`fit`; 0 = off). ``qfv/reg`` (``R`` unweighted, per step and epoch) and
    ``qfv/lambda`` (per epoch) go to ``pl_module.log``; ``lambdas`` (epoch -> the lambda
    applied) and ``refits`` (how many ran) stay on the callback.

    Why the returned loss: Lightning's ``on_before_backward`` hook sees the loss but cannot
    change it, and a second backward of the term from a hook would be reduced twice under DDP
    and miss the loss scaling of mixed precision and the division by
    ``accumulate_grad_batches``. The loss ``training_step`` returns is the one value Lightning
    takes through all of these, so the callback wraps the module's ``training_step`` on the
    instance at ``on_fit_start`` and restores it at ``teardown`` (Lightning redirects
    ``forward`` on the instance the same way). With manual optimization, or to place the term
    yourself, pass ``add_to_loss=False`` and add ``callback.loss_term(self)`` to your loss.

    ``schedule`` default: :class:`LambdaSchedule`'s defaults over ``trainer.max_epochs`` (the
    rise over the last ``min(20, max_epochs)``).
    """

    def __init__(self, schedule: Optional[LambdaSchedule] = None, refit_every: int = 10,
                 shape: str = "sq", width: float = DEFAULT_WIDTH, add_to_loss: bool = True,
                 log_prefix: str = "qfv/"):
        if isinstance(refit_every, bool) or not isinstance(refit_every, int) or refit_every < 0:
            raise QfvError(f"QfvCallback: refit_every must be an int >= 0 (optimizer steps "
                           f"between refits of the levels; 0 = off), got {refit_every!r}")
        if schedule is not None and not isinstance(schedule, LambdaSchedule):
            raise QfvError(f"QfvCallback: schedule must be a LambdaSchedule, got {schedule!r}")
        self.schedule, self.refit_every = schedule, refit_every
        self.shape, self.width = shape, width
        self.add_to_loss, self.log_prefix = add_to_loss, log_prefix
        self.reg: Optional[QuantRegularizer] = None
        self.lambdas: Dict[int, float] = {}
        self.refits = 0
        self._last_refit_step = 0
        self._refit = False

    def _schedule_for(self, trainer: pl.Trainer) -> LambdaSchedule:
        epochs = trainer.max_epochs
        if self.schedule is not None:
            if epochs is not None and epochs > self.schedule.total_epochs:
                raise QfvError(f"QfvCallback: the schedule covers {self.schedule.total_epochs} "
                               f"epochs, the trainer runs up to {epochs}")
            return self.schedule
        if epochs is None or epochs < 1:
            raise QfvError("QfvCallback: the trainer has no max_epochs; give "
                           "schedule=LambdaSchedule(total_epochs=...)")
        return LambdaSchedule(total_epochs=epochs,
                              rise_epochs=min(LambdaSchedule.rise_epochs, epochs))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the model, build the regularizer and wrap ``training_step``."""
        layers = nmult_layers(pl_module)
        if not layers:
            raise QfvError("QfvCallback: the module has no N-multiplier layers; quantize its "
                           "model first (quantize_model() or swap_weight_quant())")
        schedule = self._schedule_for(trainer)
        uses_reg = any(quant_of(m).uses_regularizer for _, m in layers)
        self.reg = QuantRegularizer(pl_module, schedule, self.shape, self.width) \
            if uses_reg else None
        self._refit = self.refit_every > 0 and any(quant_of(m).variant != "fixed"
                                                   for _, m in layers)
        self._last_refit_step = trainer.global_step
        if self.add_to_loss and self.reg is not None:
            if not pl_module.automatic_optimization:
                raise QfvError("QfvCallback: the module optimizes manually; add "
                               "callback.loss_term(self) to its loss and pass "
                               "QfvCallback(add_to_loss=False)")
            pl_module.training_step = RegularizedStep(self, pl_module, pl_module.training_step)

    def loss_term(self, pl_module: pl.LightningModule) -> Tensor:
        """``lambda(epoch) * R(model)`` for the current epoch (0 when no layer uses the
        regularizer); logs ``R`` and lambda."""
        if self.reg is None:
            return torch.zeros((), device=pl_module.device)
        epoch = pl_module.trainer.current_epoch
        lam = self.reg.lam(epoch)
        r = self.reg.unweighted()
        self.lambdas[epoch] = lam
        pl_module.log(self.log_prefix + "reg", r.detach(), on_step=True, on_epoch=True)
        pl_module.log(self.log_prefix + "lambda", lam, on_step=False, on_epoch=True)
        return lam * r

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Refit the levels when the optimizer step count reaches a multiple of
        ``refit_every`` (once per step: with gradient accumulation several batches share it)."""
        step = trainer.global_step
        if self._refit and step != self._last_refit_step and step % self.refit_every == 0:
            refit_levels_(pl_module, warm=True)
            self.refits += 1
            self._last_refit_step = step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the module its own ``training_step`` back."""
        if isinstance(pl_module.__dict__.get("training_step"), RegularizedStep):
            del pl_module.__dict__["training_step"]
