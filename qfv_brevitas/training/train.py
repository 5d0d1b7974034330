"""A plain training loop for QAT with the regularizer (SGD + momentum, cosine decay), and the
parameter split and optimizers it uses, for a user's own loop."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from qfv_brevitas.core.config import LambdaSchedule
from qfv_brevitas.core.distance import DEFAULT_WIDTH, check_shape, check_width
from qfv_brevitas.core.quantizers import nmult_layers, quant_of
from qfv_brevitas.training.refit import refit_levels_
from qfv_brevitas.training.regularizer import QuantRegularizer
from qfv_brevitas.training.sam import SharpnessAware, check_rho
from qfv_brevitas.util.configbase import QfvConfig
from qfv_brevitas.util.errors import QfvError, QfvTypeError
from qfv_brevitas.util.progress import RunProgress
from qfv_brevitas.util.validate import check_int, check_real

__all__ = ["TrainConfig", "TrainingError", "fit", "evaluate", "param_groups", "split_optimizers",
           "accuracy", "evaluate_metrics", "LossFn", "OptimizerFactory", "Metric"]

#: ``loss_fn(outputs, targets) -> scalar tensor`` (default :class:`torch.nn.CrossEntropyLoss`)
LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``optimizer(param_groups) -> optimizer(s)``: gets :func:`param_groups`' list (each group
#: names itself; the quantizers' ``r``/``c`` are the group ``"quant"``, with its own lr)
OptimizerFactory = Callable[[List[dict]], Union[torch.optim.Optimizer,
                                                Sequence[torch.optim.Optimizer]]]
#: ``metric(outputs, targets) -> float`` (or a 0-dim tensor) on one batch
Metric = Callable[[Tensor, Tensor], Union[float, Tensor]]


class TrainingError(QfvError):
    """Training diverged (a NaN or infinite loss): nothing is saved from it."""


@dataclass
class TrainConfig(QfvConfig):
    """Hyper-parameters of :func:`fit` (paper section 4: SGD, momentum 0.9, cosine decay,
    lambda held then raised exponentially over the final epochs).

    The quantizer parameters (``r``, ``c``, step) get their own optimizer. The paper uses SGD
    at 1e-6; but their eq. 7 gradient sums over a layer's weights, so its curvature grows with
    ``lambda * sqrt(n_l)`` and SGD diverges once lambda rises on large layers (seen on bnn_pynq
    LFC: r blew up to 1e10 within 2 epochs). Adam's step is bounded by its learning rate
    whatever that scale, so it is the default; ``quant_optimizer="sgd"`` gives the paper's.
    """

    epochs: int = 20
    lr: float = 0.05
    quant_lr: float = 1e-4
    quant_optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    #: lambda schedule (:class:`~qfv_brevitas.core.config.LambdaSchedule`'s defaults: paper
    #: section 4, 100 held, then raised to 2000 over the last 20 epochs)
    lambda_start: float = LambdaSchedule.start
    lambda_end: float = LambdaSchedule.end
    lambda_rise_epochs: int = LambdaSchedule.rise_epochs
    #: regularizer shape (:data:`qfv_brevitas.core.distance.SHAPES`: ``sq`` = paper, ``gauss``, ``sin``)
    reg_shape: str = "sq"
    #: Gaussian width as a fraction of the local level spacing (``reg_shape="gauss"`` only)
    reg_width: float = DEFAULT_WIDTH
    #: SAM radius (FlatENN's sharpness-aware quantization, :mod:`qfv_brevitas.training.sam`);
    #: 0 = off
    sam_rho: float = 0.0
    #: every this many optimizer steps, refit each learnable quantizer's levels to its
    #: current weights in closed form (alternating minimisation from the current levels,
    #: :func:`qfv_brevitas.training.refit.refit_levels_` with ``warm=True``), so that the levels
    #: keep following the weights; 0 = off. Layers with a fault or variability map attached are
    #: left to the device-aware regularizer. Default 10: with fitted initial levels, the one
    #: setting at or above fixed, learned-step and stock Brevitas QAT in every digits cell
    #: measured (``BENCHMARKS.md``; its lead over no refit is within noise there).
    refit_every: int = 10

    def validate(self) -> None:
        self.epochs = check_int(self.epochs, "TrainConfig.epochs", 1)
        self.batch_size = check_int(self.batch_size, "TrainConfig.batch_size", 1)
        self.seed = check_int(self.seed, "TrainConfig.seed", -2 ** 63)
        self.lambda_rise_epochs = check_int(self.lambda_rise_epochs,
                                            "TrainConfig.lambda_rise_epochs")
        self.lr = check_real(self.lr, "TrainConfig.lr", strict=True)
        for name in ("quant_lr", "momentum", "weight_decay", "lambda_start", "lambda_end"):
            setattr(self, name, check_real(getattr(self, name), f"TrainConfig.{name}"))
        if self.quant_optimizer not in ("adam", "sgd"):
            raise QfvError("TrainConfig.quant_optimizer must be 'adam' or 'sgd'")
        check_shape(self.reg_shape)
        self.reg_width = check_width(self.reg_width)
        self.sam_rho = check_rho(self.sam_rho, "TrainConfig.sam_rho", off_at_zero=True)
        if isinstance(self.refit_every, bool) or not isinstance(self.refit_every, int) \
                or self.refit_every < 0:
            raise QfvError(f"TrainConfig.refit_every must be an int >= 0 (optimizer steps "
                           f"between refits of the levels; 0 = off), got {self.refit_every!r}")

    def schedule(self) -> LambdaSchedule:
        return LambdaSchedule(self.epochs, self.lambda_start, self.lambda_end,
                              min(self.lambda_rise_epochs, self.epochs))


def param_groups(model: nn.Module, cfg: Optional[TrainConfig] = None) -> List[dict]:
    """The parameters split the way :func:`fit` trains them (``cfg``: default ``TrainConfig()``).

    ``"weights"`` (matrices, with ``cfg.weight_decay``), ``"no_decay"`` (biases, BatchNorm) and
    ``"act_scales"`` (activation quantizer scales) take the learning rate of the optimizer
    they are given to; ``"quant"`` (the weight quantizers' ``r``, ``c`` or step, also flagged
    ``"quant": True``) carries its own ``"lr"``, ``cfg.quant_lr`` (1e-4), without decay. Each
    group names itself (``"name"``); empty groups are left out. ``r``/``c`` need their own
    optimizer (Adam, see :class:`TrainConfig`): one SGD over all parameters diverged.
    :func:`split_optimizers` builds the pair.

    >>> [(g["name"], g["weight_decay"]) for g in param_groups(nn.Linear(3, 2))]
    [('weights', 0.0005), ('no_decay', 0.0)]
    """
    cfg = TrainConfig() if cfg is None else cfg
    quant, scales, decay, no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".weight_quant." in name or name.startswith("weight_quant."):
            quant.append(p)
        elif "_quant." in name:
            scales.append(p)
        elif p.dim() <= 1:
            no_decay.append(p)  # BatchNorm and biases
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "weights"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
              {"params": scales, "weight_decay": 0.0, "name": "act_scales"},
              {"params": quant, "weight_decay": 0.0, "lr": cfg.quant_lr, "quant": True,
               "name": "quant"}]
    return [g for g in groups if g["params"]]


def split_optimizers(groups: List[dict], cfg: Optional[TrainConfig] = None
                     ) -> List[torch.optim.Optimizer]:
    """:func:`fit`'s optimizers over :func:`param_groups`' ``groups``: SGD + momentum on every
    group but ``"quant"``; the quantizer parameters get their own optimizer (Adam, or SGD with
    ``cfg.quant_optimizer="sgd"``, at their group's ``quant_lr``; see :class:`TrainConfig`).
    Step both after each backward (``cfg``: default ``TrainConfig()``).

    >>> import brevitas.nn as qnn
    >>> from qfv_brevitas.core.quantizers import NMultWeightQuant
    >>> m = qnn.QuantLinear(4, 2, bias=False, weight_quant=NMultWeightQuant)
    >>> [type(o).__name__ for o in split_optimizers(param_groups(m))]
    ['SGD', 'Adam']
    """
    cfg = TrainConfig() if cfg is None else cfg
    quant = [g for g in groups if g.get("quant")]
    rest = [g for g in groups if not g.get("quant")]
    opts = [torch.optim.SGD(rest, lr=cfg.lr, momentum=cfg.momentum)] if rest else []
    if quant:
        if cfg.quant_optimizer == "adam":
            opts.append(torch.optim.Adam(quant, lr=cfg.quant_lr))
        else:
            opts.append(torch.optim.SGD(quant, lr=cfg.quant_lr, momentum=cfg.momentum))
    return opts


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return torch.device("cpu") if p is None else p.device


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512,
             device: Optional[torch.device] = None) -> float:
    """Top-1 accuracy in eval mode (N-multiplier weights snapped to their levels). Batches go
    to ``device`` (default: the model's); the count stays there until the end (one sync)."""
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else model_device(model)
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += (model(x).argmax(1) == y).sum()
        total += len(y)
    model.train(was_training)
    return int(correct) / max(total, 1)


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy of one batch: the share of rows whose largest output is the target
    (:func:`fit`'s default metric).

    >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    0.5
    """
    return float((outputs.argmax(1) == targets).sum()) / max(len(targets), 1)


def check_metrics(metrics: Mapping[str, Metric]) -> Dict[str, Metric]:
    """``metrics`` as a dict, checked: non-empty names mapped to callables."""
    if not isinstance(metrics, Mapping):
        raise QfvTypeError(f"metrics must be a dict name -> callable(outputs, targets), got "
                           f"{type(metrics).__name__}")
    for k, f in metrics.items():
        if not isinstance(k, str) or not k or not callable(f):
            raise QfvTypeError(f"metrics: {k!r} must be a non-empty name mapped to a "
                               f"callable(outputs, targets) -> float, got {f!r}")
    return dict(metrics)


@torch.no_grad()
def evaluate_metrics(model: nn.Module, dataset: Dataset, metrics: Mapping[str, Metric],
                     batch_size: int = 512, device: Optional[torch.device] = None
                     ) -> Dict[str, float]:
    """Each metric over ``dataset`` in eval mode (weights snapped to their levels): the mean of
    its per-batch values weighted by the batch sizes, exact for any mean over samples
    (accuracy, a mean loss; a metric that is not one, such as F1, is averaged per batch).
    A metric returning a tensor is read once at the end.

    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.eye(3), torch.tensor([0, 1, 0]))
    >>> evaluate_metrics(nn.Identity(), data, {"acc": accuracy}, batch_size=2)
    {'acc': 0.6666666666666666}
    """
    metrics = check_metrics(metrics)
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else model_device(model)
    sums: Dict[str, Union[float, Tensor]] = {k: 0.0 for k in metrics}
    total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        for k, f in metrics.items():
            v = f(out, y)
            sums[k] = sums[k] + (v.detach() if isinstance(v, Tensor) else float(v)) * len(y)
        total += len(y)
    model.train(was_training)
    return {k: float(v) / max(total, 1) for k, v in sums.items()}


def _raise_diverged(model: nn.Module, epoch: int, desc: str, loss: float,
                    cfg: "TrainConfig") -> None:
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    raise TrainingError(
        f"{desc}: the loss became {loss} in epoch {epoch + 1}: training diverged "
        f"(non-finite parameters: {', '.join(bad) or 'none'}); lower the learning rate "
        f"(lr={cfg.lr:g}, quant_lr={cfg.quant_lr:g}) or lambda, or check the data for NaN/inf "
        "inputs")


@dataclass
class _FitRun:
    """What one run of :func:`fit` carries from batch to batch (built by :func:`_prepare`)."""

    model: nn.Module
    cfg: TrainConfig
    loader: DataLoader
    opts: List[torch.optim.Optimizer]
    scheds: List[torch.optim.lr_scheduler.LRScheduler]
    reg: Optional[QuantRegularizer]
    sam: Optional[SharpnessAware]
    loss_fn: LossFn
    #: the metrics of each epoch's evaluation (``None``: :func:`evaluate`'s accuracy)
    metrics: Optional[Dict[str, Metric]]
    #: whether the levels are refitted every ``cfg.refit_every`` steps
    refit: bool
    device: torch.device
    #: optimizer steps taken so far (the refit schedule counts them over all epochs)
    steps: int = 0


def _build_optimizers(model: nn.Module, cfg: TrainConfig, factory: Optional[OptimizerFactory]
                      ) -> List[torch.optim.Optimizer]:
    """``factory(param_groups(model, cfg))`` as a list (default :func:`split_optimizers`)."""
    if factory is None:
        factory = partial(split_optimizers, cfg=cfg)
    made = factory(param_groups(model, cfg))
    opts = [made] if isinstance(made, torch.optim.Optimizer) else list(made or ())
    if not opts or not all(isinstance(o, torch.optim.Optimizer) for o in opts):
        raise QfvTypeError(f"fit: optimizer= must return a torch optimizer or a list of them, "
                           f"got {made!r}")
    return opts


def _prepare(model: nn.Module, train: Dataset, cfg: TrainConfig,
             device: Optional[torch.device], loss_fn: Optional[LossFn] = None,
             optimizer: Optional[OptimizerFactory] = None,
             metrics: Optional[Mapping[str, Metric]] = None) -> _FitRun:
    """Seeds, the shuffled loader, optimizers with one cosine decay over all steps, and the
    regularizer, SAM and refits where the model and ``cfg`` ask for them."""
    if loss_fn is not None and not callable(loss_fn):
        raise QfvTypeError(f"fit: loss_fn must be a callable(outputs, targets) -> loss, "
                           f"got {loss_fn!r}")
    metrics = check_metrics(metrics) if metrics is not None else None
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=g)
    opts = _build_optimizers(model, cfg, optimizer)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.epochs * len(loader))
              for o in opts]
    uses_reg = any(quant_of(m).uses_regularizer for _, m in nmult_layers(model))
    reg = QuantRegularizer(model, cfg.schedule(), shape=cfg.reg_shape,
                           width=cfg.reg_width) if uses_reg else None
    sam = SharpnessAware(model, cfg.sam_rho) if cfg.sam_rho > 0 else None
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    refit = cfg.refit_every > 0 and any(quant_of(m).variant != "fixed"
                                        for _, m in nmult_layers(model))
    device = torch.device(device) if device is not None else model_device(model)
    return _FitRun(model, cfg, loader, opts, scheds, reg, sam, loss_fn, metrics, refit, device)


def _zero_grad(run: _FitRun) -> None:
    for o in run.opts:
        o.zero_grad(set_to_none=True)


def _sam_gradient(run: _FitRun, x: Tensor, y: Tensor, lam: float) -> None:
    """SAM: replace the gradients by those at the worst point within rho, then move back to
    the weights (the optimizer applies them there)."""
    run.sam.ascend()
    with run.sam.frozen_norm_stats():
        loss2 = run.loss_fn(run.model(x), y)
        if run.reg is not None:
            loss2 = loss2 + lam * run.reg.unweighted()
        _zero_grad(run)
        loss2.backward()
    run.sam.restore()


def _train_step(run: _FitRun, x: Tensor, y: Tensor, lam: float
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """One optimizer step on a batch (moved to the run's device); returns the task loss and the
    unweighted regularizer (``None`` without one), detached, for the epoch's sums."""
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    task = run.loss_fn(run.model(x), y)
    loss = task
    r = None
    if run.reg is not None:
        r = run.reg.unweighted()
        loss = loss + lam * r
        r = r.detach()
    _zero_grad(run)
    loss.backward()
    if run.sam is not None:
        _sam_gradient(run, x, y, lam)
    for o, sch in zip(run.opts, run.scheds):
        o.step()
        sch.step()
    run.steps += 1
    if run.refit and run.steps % run.cfg.refit_every == 0:
        refit_levels_(run.model, warm=True)
    return task.detach(), r


def _train_epoch(run: _FitRun, epoch: int, bar: RunProgress) -> Tuple[Tensor, Tensor, float]:
    """One pass over the loader; returns the summed task losses and regularizer values (on the
    run's device: no host sync per batch) and the lambda this epoch applied."""
    run.model.train()
    tl = torch.zeros((), device=run.device)
    rl = torch.zeros((), device=run.device)
    # the lambda this epoch applies; the history records this value, not a recomputation
    lam = run.reg.lam(epoch) if run.reg is not None else 0.0
    for x, y in run.loader:
        task, r = _train_step(run, x, y, lam)
        if r is not None:
            rl += r
        tl += task
        bar.update(1)
    return tl, rl, lam


def _test_scores(run: _FitRun, test: Optional[Dataset]) -> Dict[str, float]:
    """The epoch's evaluation: ``{"acc": ...}`` (:func:`evaluate`) or the run's metrics; NaN
    without a test set."""
    names = ["acc"] if run.metrics is None else list(run.metrics)
    if test is None:
        return {k: float("nan") for k in names}
    if run.metrics is None:
        return {"acc": evaluate(run.model, test, device=run.device)}
    return evaluate_metrics(run.model, test, run.metrics, device=run.device)


def _record_epoch(run: _FitRun, hist: Dict[str, list], epoch: int, sums: Tuple[Tensor, Tensor],
                  lam: float, test: Optional[Dataset], desc: str) -> Dict[str, float]:
    """Read the epoch's sums once (an error if training diverged), append the epoch's row to
    ``hist`` (each metric as ``test_<name>``) and return the metrics."""
    tl, rl = float(sums[0]), float(sums[1])
    if not (math.isfinite(tl) and math.isfinite(rl)):
        _raise_diverged(run.model, epoch, desc, tl if not math.isfinite(tl) else rl, run.cfg)
    hist["task_loss"].append(tl / len(run.loader))
    hist["reg"].append(rl / len(run.loader))
    hist["lambda"].append(lam)
    scores = _test_scores(run, test)
    for k, v in scores.items():
        hist.setdefault(f"test_{k}", []).append(v)
    return scores


def fit(model: nn.Module, train: Dataset, test: Optional[Dataset], cfg: TrainConfig,
        desc: str = "train", progress: Union[bool, RunProgress] = True,
        device: Optional[torch.device] = None,
        epoch_end: Optional[Callable[[int], None]] = None, *,
        loss_fn: Optional[LossFn] = None, optimizer: Optional[OptimizerFactory] = None,
        metrics: Optional[Mapping[str, Metric]] = None) -> Dict[str, list]:
    """Train ``model``; with N-multiplier layers the loss adds ``lambda(epoch) * R(model)``.

    ``loss_fn(outputs, targets)``: the task loss (default cross-entropy; SAM uses it too).
    ``optimizer(groups)``: builds the optimizer(s) from :func:`param_groups` (each group names
    itself; ``r``/``c`` are the group ``"quant"``, carrying ``lr=cfg.quant_lr``, the others
    take the optimizer's lr); default :func:`split_optimizers` (SGD + momentum at ``cfg.lr`` on
    the weights, Adam on ``r``/``c``).
    Whatever it returns gets one cosine decay over all steps, and the levels' refits.
    ``metrics``: ``{name: metric(outputs, targets) -> float}`` evaluated on ``test`` after each
    epoch (:func:`evaluate_metrics`), in the history as ``test_<name>``; default accuracy
    (``test_acc``, :func:`evaluate`).
    ``epoch_end(epoch)`` runs after each epoch's updates, before its evaluation (e.g. the
    periodic nearest-valid-level remapping of fault-aware training).
    ``progress``: ``True`` shows one bar over all batches of all epochs (rate, time left; plain
    lines when stderr is not a terminal), ``False`` nothing; a :class:`RunProgress` of a larger
    run is advanced instead, with ``desc`` as its phase. Batches go to ``device`` (default: the
    model's); losses are summed there and read once per epoch, so a GPU step makes no host sync.
    Returns the history: per epoch the task loss, the regularizer, lambda and the metrics (NaN
    without a test set).
    """
    run = _prepare(model, train, cfg, device, loss_fn, optimizer, metrics)
    hist: Dict[str, list] = {"task_loss": [], "reg": [], "lambda": []}
    for k in (["acc"] if run.metrics is None else run.metrics):
        hist[f"test_{k}"] = []
    own = not isinstance(progress, RunProgress)
    bar = RunProgress(cfg.epochs * len(run.loader), desc, enabled=bool(progress)) if own \
        else progress
    if not own:
        bar.set_phase(desc)
    for epoch in range(cfg.epochs):
        tl, rl, lam = _train_epoch(run, epoch, bar)
        if epoch_end is not None:
            epoch_end(epoch)
        scores = _record_epoch(run, hist, epoch, (tl, rl), lam, test, desc)
        info = {"epoch": f"{epoch + 1}/{cfg.epochs}", "loss": f"{hist['task_loss'][-1]:.3f}",
                "reg": f"{hist['reg'][-1]:.2e}"}
        info.update((k, f"{v:.3f}") for k, v in scores.items())
        bar.set_info(**info)
    if own:
        bar.close()
    return hist
