"""The Brevitas seam: a ``tensor_quant`` module, its proxy, and ready weight-quant injectors.

>>> import brevitas.nn as qnn
>>> layer = qnn.QuantLinear(8, 4, bias=False, weight_quant=NMultWeightQuant, weight_bit_width=3)
>>> quant_of(layer).bits, tuple(quant_of(layer).multipliers().shape)
(3, (1, 3))
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from brevitas import config as brevitas_config
from brevitas.core.function_wrapper.misc import Identity
from brevitas.inject import ExtendedInjector, value
from brevitas.proxy import WeightQuantProxyFromInjector

from qfv_brevitas.core import fitting as FIT
from qfv_brevitas.core import intview as IV
from qfv_brevitas.core import levels as L
from qfv_brevitas.core.chip import Chip
from qfv_brevitas.core.config import FORWARD_MODES, INITS, VARIANTS
from qfv_brevitas.core.distance import DEFAULT_WIDTH
from qfv_brevitas.core.groups import GroupLayout
from qfv_brevitas.core.search import sync_free
from qfv_brevitas.util.validate import check_choice
from qfv_brevitas.util.errors import QfvError

__all__ = [
    "NMultTensorQuant",
    "NMultWeightQuantProxy",
    "NMultWeightQuant",
    "NMultWeightPerChannelQuant",
    "LearnedStepWeightQuant",
    "LearnedStepWeightPerChannelQuant",
    "FixedLevelWeightQuant",
    "FixedLevelWeightPerChannelQuant",
    "quant_of",
    "is_nmult_layer",
    "nmult_layers",
]


class NMultTensorQuant(nn.Module):
    """Weight quantizer with levels ``{<r, S> + c : S in {0,1}^N}`` (paper eq. 2-5).

    Holds ``r`` (``(G, N)``) and ``c`` (``(G,)``), ``G = 1`` per tensor or the number of output
    channels. Variants: ``nmult`` learns ``r`` and ``c``; ``step`` learns a step ``s`` with
    ``r_i = s * 2**i`` and ``c``; ``fixed`` keeps the initial uniform grid.

    Initial levels (``level_init``, :data:`qfv_brevitas.core.config.INITS`): ``"lsq"`` the
    symmetric uniform grid with LSQ's step ``2 mean|w| / sqrt(Q_P)``; ``"uniform"`` the uniform
    grid with the least squared error to the weights; ``"fit"`` levels fitted to the weights
    within the variant's family (:func:`qfv_brevitas.core.fitting.fit_multipliers` for ``nmult``,
    the best uniform grid for ``step`` and ``fixed``).

    Integer view (``frac_bits``, :mod:`qfv_brevitas.core.intview`): ``None`` (off), an
    integer ``f`` or ``"auto"`` (chosen from the initial levels). With it ``r`` and ``c`` are
    used rounded to ``m * 2**-f`` (straight-through gradient), every level is an integer times
    ``2**-f``, and the forward's ``scale`` is ``2**-f`` and its ``bit_width`` the signed width
    of those integers: the proxy then hands the layer an ``IntQuantTensor``.

    Returns Brevitas' tuple ``(value, scale, zero_point, bit_width)``; without the integer view
    ``scale`` is nominal (the smallest multiplier) since the levels need not be uniform.
    """

    def __init__(self, bit_width, tracked_parameter_list: List[Tensor], quant_variant: str = "nmult",
                 forward_mode: str = "paper", scaling_per_output_channel: bool = False,
                 output_channel_dim: int = 0, layer_name: Optional[str] = None,
                 level_init: str = "lsq", frac_bits: Union[None, int, str] = None):
        super().__init__()
        self.bits = L.check_bits(bit_width, f"weight quantizer{_where(layer_name)}")
        self.variant = check_choice(quant_variant, VARIANTS, "quantizer variant")
        self.mode = check_choice(forward_mode, FORWARD_MODES, "forward mode")
        self.level_init = check_choice(level_init, INITS, "level init")
        self.per_channel = bool(scaling_per_output_channel)
        self.channel_dim = int(output_channel_dim)
        self.layer_name = layer_name
        w = tracked_parameter_list[0]
        if self.per_channel and not 0 <= self.channel_dim < w.dim():
            raise QfvError(
                f"per-channel weight quantizer{_where(layer_name)}: output channel axis "
                f"{self.channel_dim} does not exist in a weight of shape {tuple(w.shape)}")
        self.groups = w.shape[self.channel_dim] if self.per_channel else 1
        self.weight_shape = tuple(w.shape)
        self.layout = GroupLayout(self.channel_dim if self.per_channel else -1)
        #: fractional bits of the integer view (``None``: off); see :meth:`use_integer_view`
        self.frac_bits: Optional[int] = None
        requested = IV.check_frac_bits(frac_bits, f"weight quantizer{_where(layer_name)} frac_bits")
        self.use_chip(Chip())  # an ideal chip until the proxy hands over its own
        # brevitas.graph builds layers on the meta device: create r/c beside the weight.
        if w.is_meta:
            step = torch.ones(self.groups, dtype=w.dtype, device=w.device)
            r, c = L.uniform_multipliers(step, self.bits)
        else:
            w2d = self.to_groups(w.detach())
            L.check_finite(w2d, f"initialising the weight quantizer{_where(layer_name)}")
            step, r, c = self._initial_levels(w2d)
            zero = int((w2d.abs().amax(dim=1) == 0).sum())
            if zero:
                warnings.warn(
                    f"weight quantizer{_where(layer_name)}: "
                    + (f"{zero} of {self.groups} channels have" if self.per_channel else "the layer has")
                    + " all-zero weights, so its levels start collapsed (step 1e-8); "
                    + ("the 'fixed' variant keeps them there: initialise the weights first"
                       if quant_variant == "fixed" else
                       "r and c must be learned from there: initialise the weights first"),
                    UserWarning, stacklevel=2)
        if self.variant == "nmult":
            self.r = nn.Parameter(r)
            self.c = nn.Parameter(c)
        elif self.variant == "step":
            self.step = nn.Parameter(step)
            self.c = nn.Parameter(c)
        else:
            self.register_buffer("r", r)
            self.register_buffer("c", c)
        if requested is not None and not (w.is_meta and requested == "auto"):
            self.use_integer_view(requested, w)

    @torch.no_grad()
    def use_integer_view(self, frac_bits: Union[int, str] = "auto",
                         w: Optional[Tensor] = None) -> int:
        """From now on use ``r`` and ``c`` rounded to ``m * 2**-frac_bits`` (every level an
        integer times ``2**-frac_bits``); ``"auto"`` picks the smallest ``f`` whose levels fit
        the weights ``w`` within :data:`~qfv_brevitas.core.intview.AUTO_TOLERANCE` of the
        unrounded levels' squared error. Returns ``f``. ``r`` and ``c`` keep their values (the
        rounding happens in the forward pass), so optimizers holding them keep working."""
        frac_bits = IV.check_frac_bits(frac_bits, f"weight quantizer{_where(self.layer_name)} "
                                                  "frac_bits")
        if frac_bits is None:
            self.frac_bits = None
            return None
        if frac_bits == "auto":
            if w is None:
                raise QfvError("frac_bits='auto' chooses f from the weights: pass them")
            self.frac_bits = None  # choose from the unrounded levels
            frac_bits = IV.choose_frac_bits(self.checked_groups(w.detach()),
                                            self.multipliers(), self.offset())
        lo, hi = IV.integer_range(self.multipliers(), self.offset(), frac_bits)
        if int(IV.signed_width(lo, hi)) > IV.MAX_INT_BITS:
            raise QfvError(f"weight quantizer{_where(self.layer_name)}: at frac_bits="
                           f"{frac_bits} its levels need more than {IV.MAX_INT_BITS}-bit "
                           "integers; use fewer fractional bits")
        self.frac_bits = int(frac_bits)
        return self.frac_bits

    @property
    def integer_view(self) -> bool:
        """Whether every level is an integer times ``2**-frac_bits``."""
        return self.frac_bits is not None

    def integer_width(self) -> Tensor:
        """Signed width of the integer levels (float 0-dim tensor; the integer view only)."""
        return IV.signed_width(*IV.integer_range(self.multipliers(), self.offset(),
                                                 self.frac_bits))

    def _initial_levels(self, w2d: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(step, r, c)`` of the starting grid (``step`` is used by the ``step`` variant)."""
        if self.level_init == "lsq":
            step = L.lsq_step_init(w2d, self.bits)
            return (step, *L.uniform_multipliers(step, self.bits))
        if self.level_init == "fit" and self.variant == "nmult":
            fit = FIT.fit_multipliers(w2d, self.bits)
            return fit.uniform.step, fit.r, fit.c
        grid = FIT.best_uniform_grid(w2d, self.bits)
        return (grid.step, *grid.multipliers(self.bits))

    @torch.no_grad()
    def refit_(self, w: Tensor, warm: bool = False) -> Tuple[Tensor, Tensor]:
        """Fit this quantizer's levels to the weights ``w``, in place; returns the per-group
        squared error before and after (float64).

        ``warm=False``: the fit of ``level_init="fit"`` (multi-start, never worse than the best
        uniform grid); ``warm=True``: alternating minimisation from the current levels only
        (cheap, never worse than them; used while training). ``nmult`` fits ``r`` and ``c``,
        ``step`` the step and ``c``; ``fixed`` levels are set only by a full fit.
        The parameters are updated in place, so optimizers that hold them keep working."""
        w2d = self.checked_groups(w.detach())
        before = FIT.grid_error(w2d, self.levels().detach())
        if self.variant == "fixed" and warm:
            return before, before
        r0, c0 = self.multipliers().detach(), self.offset().detach()
        if self.variant == "nmult":
            fit = FIT.fit_multipliers(w2d, self.bits, init=(r0, c0), search=not warm)
            self.r.copy_(fit.r)
            self.c.copy_(fit.c)
            after = fit.error
        else:
            init = (self.step.detach(), c0) if self.variant == "step" else (r0[:, 0], c0)
            grid = FIT.best_uniform_grid(w2d, self.bits, init=init, search=not warm)
            if self.variant == "step":
                self.step.copy_(grid.step)
            else:
                self.r.copy_(grid.multipliers(self.bits)[0])
            self.c.copy_(grid.offset)
            after = grid.error
        if self.integer_view:  # the fit is of real r, c; the layer uses them rounded
            after = FIT.grid_error(w2d, self.levels().detach())
        return before, after

    # -- levels --------------------------------------------------------------------------
    def multipliers(self) -> Tensor:
        """Effective bit multipliers ``(G, N)`` (differentiable); with the integer view
        rounded to ``m * 2**-frac_bits`` (straight-through gradient)."""
        if self.variant == "step":
            pow2 = 2.0 ** torch.arange(self.bits, dtype=self.step.dtype, device=self.step.device)
            r = self.step[:, None] * pow2
        else:
            r = self.r
        return r if self.frac_bits is None else IV.round_ste(r, self.frac_bits)

    def offset(self) -> Tensor:
        """The offset ``c`` ``(G,)``; with the integer view rounded like the multipliers."""
        return self.c if self.frac_bits is None else IV.round_ste(self.c, self.frac_bits)

    def levels(self) -> Tensor:
        """Level table ``(G, 2**N)`` indexed by code (differentiable in ``r`` and ``c``)."""
        return L.level_table(self.multipliers(), self.offset())

    # -- layout ----------------------------------------------------------------------------
    def to_groups(self, w: Tensor) -> Tensor:
        """View ``w`` as ``(G, M)``: one row per output channel (or a single row)."""
        return self.layout.to_groups(w)

    def from_groups(self, w2d: Tensor, shape) -> Tensor:
        return self.layout.from_groups(w2d, shape)

    def check_weight(self, w: Tensor) -> None:
        if self.per_channel and (w.dim() <= self.channel_dim
                                 or w.shape[self.channel_dim] != self.groups):
            raise QfvError(
                f"per-channel weight quantizer{_where(self.layer_name)} has {self.groups} "
                f"channels on axis {self.channel_dim} but got a weight of shape {tuple(w.shape)}")

    # -- the chip (handed over by the proxy; an ideal one until then) ------------------------
    @property
    def chip(self) -> Chip:
        """The :class:`~qfv_brevitas.core.chip.Chip` this layer's weights are programmed into."""
        return self.__dict__["_chip"]

    def use_chip(self, chip: Chip) -> None:
        """Program this layer's weights into ``chip`` (its maps, mapping and bit flips) from
        now on. The chip is held, not registered: its owner (the weight proxy) saves it."""
        self.__dict__["_chip"] = chip.bind(self.layout, self.bits, self.weight_shape,
                                           self.layer_name)

    # -- quantization ----------------------------------------------------------------------
    def checked_groups(self, w: Tensor, training: bool = False) -> Tensor:
        """``w`` as ``(G, M)`` after checking its shape and (except in a GPU training step)
        that it is finite."""
        self.check_weight(w)
        w2d = self.to_groups(w)
        # In a GPU training step the check would be a host sync per layer; there a NaN weight
        # reaches the output through the straight-through term and fit reports it per epoch.
        # Skipped while torch.compile / torch.export trace (a host sync breaks the graph):
        # compiled steps rely on fit's once-per-epoch check; eager calls keep this one.
        if not (training and sync_free(w2d)) and not torch.compiler.is_compiling():
            L.check_finite(w2d, f"weights of {self.layer_name or 'layer'}")
        return w2d

    @torch.no_grad()
    def snap(self, w: Tensor) -> Tensor:
        """Each weight's deployed value (no gradient): its nearest level, or with a fault or
        variability map attached, what the chip holds for the programmed code."""
        w2d = self.checked_groups(w)
        return self.from_groups(self.chip.snap(w2d, self.multipliers(), self.offset()), w.shape)

    @torch.no_grad()
    def codes(self, w: Tensor) -> Tensor:
        """Each weight's programmed N-bit code (int64, shape of ``w``): ideally its level is
        ``levels[code]``; with a map attached and ``deploy_mapping="aware"`` the code whose
        deployed value is nearest."""
        w2d = self.checked_groups(w)
        return self.from_groups(self.chip.codes(w2d, self.multipliers(), self.offset()),
                                w.shape)

    def distance(self, w: Tensor, shape: str = "sq", width: float = DEFAULT_WIDTH) -> Tensor:
        """``sum_i min_q (w_i - q)^2`` over this layer (eq. 6/7 without the factors), or
        another regularizer shape (:mod:`qfv_brevitas.core.distance`).

        With a fault or variability map attached, ``q`` ranges over the levels this weight can
        actually take on the chip (eq. 11, eq. 12): unreachable levels are excluded."""
        out = self.distance_unchecked(w, shape, width)
        # (Not while compiling: a host sync; eager calls check.)
        if not torch.compiler.is_compiling() and not torch.isfinite(out):
            self.raise_not_finite(w)
        return out

    def raise_not_finite(self, w: Tensor) -> None:
        """The error for a non-finite regularizer term: NaN/inf weights, else diverged r/c."""
        L.check_finite(self.to_groups(w), f"weights of {self.layer_name or 'layer'}")
        raise QfvError(f"levels of {self.layer_name or 'layer'} are not finite: r/c diverged")

    def distance_unchecked(self, w: Tensor, shape: str = "sq",
                           width: float = DEFAULT_WIDTH) -> Tensor:
        """:meth:`distance` without the finiteness check of the result (a host sync on a GPU):
        :func:`qfv_brevitas.training.regularizer.regularization_loss` checks the sum over all
        layers once."""
        self.check_weight(w)
        return self.chip.distance(self.to_groups(w), self.multipliers(), self.offset(), shape,
                                  width)

    @property
    def uses_regularizer(self) -> bool:
        return self.mode in ("paper", "both")

    def nominal_scale(self) -> Tensor:
        """Per group ``(G,)``: ``2**-frac_bits`` with the integer view (exact), else the
        smallest multiplier (nominal: the levels need not be integers times it)."""
        if self.frac_bits is not None:
            return torch.full((self.groups,), 2.0 ** -self.frac_bits, dtype=self.c.dtype,
                              device=self.c.device)
        return self.multipliers().detach().abs().min(dim=1).values

    def shaped_scale(self, ndim: int) -> Tensor:
        """:meth:`nominal_scale` shaped as Brevitas shapes a weight's scale: 0-dim per tensor,
        broadcasting along the output channel axis of an ``ndim``-dim weight per channel."""
        scale = self.nominal_scale()
        if not self.per_channel:
            return scale.reshape(())
        shape = [1] * ndim
        shape[self.channel_dim] = self.groups
        return scale.view(shape)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        self.check_weight(x)
        chip = self.chip
        if chip.flips is not None:
            # Bit flips are read on every pass, whatever the mode; while training the read
            # values carry a straight-through gradient to the weights.
            w2d = self.checked_groups(x, training=self.training)
            r, c = self.multipliers(), self.offset()
            if self.training and torch.is_grad_enabled():
                out = self.from_groups(chip.ste(w2d, r, c), x.shape)
            else:
                out = self.from_groups(chip.read(w2d, r, c), x.shape)
        elif self.mode == "paper" and self.training:
            out = x  # the paper trains on full-precision weights; the regularizer pulls them in
        elif self.mode in ("ste", "both") and self.training:
            # Training through what the chip holds (ideal: the nearest level; with maps the
            # simulated chip-in-loop): r/c get exact gradients, the weights a straight-through one.
            w2d = self.checked_groups(x, training=True)
            out = self.from_groups(chip.ste(w2d, self.multipliers(), self.offset()), x.shape)
        else:
            out = self.snap(x)
        scale = self.shaped_scale(x.dim())
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        if self.frac_bits is not None:
            return out, scale.to(x.dtype), zero, self.integer_width().to(x.device)
        # torch.full, not torch.tensor: no host-to-device copy (a sync) on every forward pass.
        return out, scale, zero, torch.full((), float(self.bits), device=x.device)

    # -- state ---------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"bits": self.bits, "variant": self.variant, "mode": self.mode,
                "per_channel": self.per_channel, "groups": self.groups,
                "frac_bits": self.frac_bits}

    def get_extra_state(self):
        return self.config_dict()

    def set_extra_state(self, state) -> None:
        mine = self.config_dict()
        for key in ("bits", "variant", "per_channel", "groups"):
            if key in state and state[key] != mine[key]:
                raise QfvError(
                    f"checkpoint does not match the weight quantizer{_where(self.layer_name)}: "
                    f"{key} is {state[key]!r} in the checkpoint but {mine[key]!r} in the model. "
                    "Build the model with the checkpoint's configuration before loading it.")
        self.mode = check_choice(state.get("mode", self.mode), FORWARD_MODES, "forward mode")
        # The integer view is state: a checkpoint trained on a grid keeps that grid.
        self.frac_bits = IV.check_frac_bits(state.get("frac_bits"), "checkpoint frac_bits")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # Loading a float checkpoint into a quantized model (Brevitas' IGNORE_MISSING_KEYS):
        # keep the initialisation from the loaded weights, as Brevitas' own scaling modules do.
        if brevitas_config.IGNORE_MISSING_KEYS:
            for name in list(self._parameters) + list(self._buffers) + ["_extra_state"]:
                key = prefix + name
                if key in missing_keys:
                    missing_keys.remove(key)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, variant={self.variant}, mode={self.mode}, "
                f"per_channel={self.per_channel}, level_init={self.level_init}"
                + ("" if self.frac_bits is None else f", frac_bits={self.frac_bits}"))


def _where(name: Optional[str]) -> str:
    return f" of {name}" if name else ""


class NMultWeightQuantProxy(WeightQuantProxyFromInjector):
    """Weight proxy of the N-multiplier family.

    Its own class so that export handlers can be matched on it: Brevitas' stock handler would
    export these weights as a uniform ``Quant`` node, silently wrong.

    With the integer view (:meth:`use_integer_view`) the layer receives an ``IntQuantTensor``
    (scale ``2**-f``, the integers' signed width), so Brevitas' integer biases, quant tensors
    between layers and accumulator widths work; without it, plain tensors, so that no
    downstream op consumes the nominal scale. A layer that needs a quant tensor (an integer
    bias whose scale is derived from the weight's, or ``return_quant_tensor=True`` without an
    output quantizer) switches the integer view on (``frac_bits="auto"``) at its first forward
    pass unless it was given ``weight_frac_bits``.
    """

    def __init__(self, quant_layer: nn.Module, quant_injector) -> None:
        super().__init__(quant_layer, quant_injector)
        self.skip_create_quant_tensor = False
        # A mode or grid restored from a state dict must survive the next re-initialisation
        # of the quantizer from the injector: keep the injector in step after every load.
        self.register_load_state_dict_post_hook(NMultWeightQuantProxy._sync_injector)

    @property
    def skip_create_quant_tensor(self) -> bool:
        """Plain tensors unless the integer view is on (or Brevitas asks for plain ones)."""
        tq = self.__dict__.get("_modules", {}).get("tensor_quant")
        return self.__dict__.get("_skip_qt", False) or not getattr(tq, "integer_view", False)

    @skip_create_quant_tensor.setter
    def skip_create_quant_tensor(self, value: bool) -> None:
        self.__dict__["_skip_qt"] = bool(value)

    def needs_quant_tensor(self) -> bool:
        """Whether a layer this proxy serves consumes the weight's quant tensor: an integer
        bias scaled by input scale x weight scale, or a quant tensor output with no output
        quantizer to make it."""
        for layer in self.tracked_module_list:
            bq = getattr(layer, "bias_quant", None)
            if getattr(layer, "bias", None) is not None and bq is not None and \
                    bq.is_quant_enabled and getattr(bq, "requires_input_scale", False):
                return True
            oq = getattr(layer, "output_quant", None)
            if getattr(layer, "return_quant_tensor", False) and not (
                    oq is not None and oq.is_quant_enabled):
                return True
        return False

    def use_integer_view(self, frac_bits: Union[int, str] = "auto") -> int:
        """Switch the integer view on (:meth:`NMultTensorQuant.use_integer_view`, ``"auto"``
        chooses ``f`` from the layer's weights) and keep it through Brevitas re-initialising
        the quantizer. Returns ``f``."""
        f = self.tensor_quant.use_integer_view(frac_bits, self.tracked_parameter_list[0])
        self.quant_injector = self.quant_injector.let(frac_bits=f)
        return f

    def forward(self, x: Tensor):
        tq = self.tensor_quant
        if tq is not None and tq.frac_bits is None and self.is_quant_enabled \
                and self.needs_quant_tensor():
            self.use_integer_view("auto")
        return super().forward(x)

    def init_tensor_quant(self, *args, **kwargs):
        super().init_tensor_quant(*args, **kwargs)
        if "chip" not in self._modules:
            # The chip is the proxy's submodule: its maps travel with the state dict and with
            # .to(device); the (re-)initialised tensor quantizer is handed the same chip.
            self.chip = Chip()
        if self.tensor_quant is not None:
            self.tensor_quant.use_chip(self.chip)

    # Maps and mapping were saved on the proxy itself before the chip existed.
    _LEGACY_KEYS = {"fault_sa0": "chip.sa0", "fault_sa1": "chip.sa1", "var_lrs": "chip.lrs",
                    "var_hrs": "chip.hrs"}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for old, new in self._LEGACY_KEYS.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        legacy = state_dict.get(prefix + "_extra_state")
        if isinstance(legacy, dict) and set(legacy) == {"deploy_mapping"}:
            state_dict.setdefault(prefix + "chip._extra_state", state_dict.pop(prefix + "_extra_state"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @staticmethod
    def _sync_injector(module, incompatible_keys) -> None:
        tq = module.tensor_quant
        if tq is not None and module.quant_injector.forward_mode != tq.mode:
            module.quant_injector = module.quant_injector.let(forward_mode=tq.mode)
        if tq is not None and module.quant_injector.frac_bits != tq.frac_bits:
            module.quant_injector = module.quant_injector.let(frac_bits=tq.frac_bits)

    @property
    def input_view_impl(self):
        return Identity()

    def retrieve_attribute(self, attribute: str):
        if not self.is_quant_enabled:
            return None
        tq = self.tensor_quant
        if attribute == "bit_width":
            return tq.integer_width() if tq.integer_view else torch.tensor(float(tq.bits))
        if attribute == "scale":
            if tq.integer_view:
                return tq.shaped_scale(self.tracked_parameter_list[0].dim())
            return tq.nominal_scale()
        if attribute == "zero_point":
            return torch.zeros(())
        raise AttributeError(attribute)


class NMultWeightQuant(ExtendedInjector):
    """N-multiplier weights, per tensor: ``weight_quant=NMultWeightQuant, weight_bit_width=4``.

    Layer keyword arguments with the ``weight_`` prefix override the attributes below, e.g.
    ``weight_forward_mode="ste"``, ``weight_scaling_per_output_channel=True`` or
    ``weight_level_init="fit"`` (levels fitted to the layer's weights) or
    ``weight_frac_bits="auto"`` (the integer view: every level an integer times ``2**-f``,
    the weights an ``IntQuantTensor``; :mod:`qfv_brevitas.core.intview`).
    """

    proxy_class = NMultWeightQuantProxy
    tensor_quant = NMultTensorQuant
    bit_width = 4
    quant_variant = "nmult"
    forward_mode = "paper"
    level_init = "lsq"
    frac_bits = None
    scaling_per_output_channel = False
    signed = True
    layer_name = None

    @value
    def output_channel_dim(module):
        if isinstance(module, tuple):
            module = module[0]
        return getattr(module, "output_channel_dim", 0)


class NMultWeightPerChannelQuant(NMultWeightQuant):
    scaling_per_output_channel = True


class LearnedStepWeightQuant(NMultWeightQuant):
    """Uniform levels with a learned step and offset (paper eq. 3), LSQ initialisation."""

    quant_variant = "step"


class LearnedStepWeightPerChannelQuant(LearnedStepWeightQuant):
    scaling_per_output_channel = True


class FixedLevelWeightQuant(NMultWeightQuant):
    """Uniform levels fixed at their LSQ initialisation (nothing learned)."""

    quant_variant = "fixed"


class FixedLevelWeightPerChannelQuant(FixedLevelWeightQuant):
    scaling_per_output_channel = True


def is_nmult_layer(module: nn.Module) -> bool:
    proxy = getattr(module, "weight_quant", None)
    return isinstance(proxy, NMultWeightQuantProxy) and proxy.tensor_quant is not None


def quant_of(module: nn.Module) -> NMultTensorQuant:
    """The :class:`NMultTensorQuant` of a quantized layer (a clear error otherwise)."""
    if not is_nmult_layer(module):
        raise TypeError(f"{type(module).__name__} has no N-multiplier weight quantizer")
    return module.weight_quant.tensor_quant


def nmult_layers(model: nn.Module):
    """``(name, layer)`` for every layer of ``model`` with an N-multiplier weight quantizer."""
    return [(n, m) for n, m in model.named_modules() if is_nmult_layer(m)]
