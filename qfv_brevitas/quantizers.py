"""The Brevitas seam: a ``tensor_quant`` module, its proxy, and ready weight-quant injectors.

>>> import brevitas.nn as qnn
>>> layer = qnn.QuantLinear(8, 4, bias=False, weight_quant=NMultWeightQuant, weight_bit_width=3)
>>> quant_of(layer).bits, tuple(quant_of(layer).multipliers().shape)
(3, (1, 3))
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from brevitas import config as brevitas_config
from brevitas.core.function_wrapper.misc import Identity
from brevitas.inject import ExtendedInjector, value
from brevitas.proxy import WeightQuantProxyFromInjector

from . import levels as L
from .config import MODES, VARIANTS, check_choice

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
    ``r_i = s * 2**i`` and ``c``; ``fixed`` keeps the initial uniform grid. All start from the
    symmetric uniform grid with LSQ's step ``2 mean|w| / sqrt(Q_P)``.

    Returns Brevitas' tuple ``(value, scale, zero_point, bit_width)``; ``scale`` is nominal
    (the smallest multiplier) since the levels need not be uniform.
    """

    def __init__(self, bit_width, tracked_parameter_list: List[Tensor], quant_variant: str = "nmult",
                 forward_mode: str = "paper", scaling_per_output_channel: bool = False,
                 output_channel_dim: int = 0, layer_name: Optional[str] = None):
        super().__init__()
        self.bits = L.check_bits(bit_width, f"weight quantizer{_where(layer_name)}")
        self.variant = check_choice(quant_variant, VARIANTS, "quantizer variant")
        self.mode = check_choice(forward_mode, MODES, "forward mode")
        self.per_channel = bool(scaling_per_output_channel)
        self.channel_dim = int(output_channel_dim)
        self.layer_name = layer_name
        w = tracked_parameter_list[0]
        if self.per_channel and not 0 <= self.channel_dim < w.dim():
            raise ValueError(
                f"per-channel weight quantizer{_where(layer_name)}: output channel axis "
                f"{self.channel_dim} does not exist in a weight of shape {tuple(w.shape)}")
        self.groups = w.shape[self.channel_dim] if self.per_channel else 1
        self.weight_shape = tuple(w.shape)
        # brevitas.graph builds layers on the meta device: create r/c beside the weight.
        if w.is_meta:
            step = torch.ones(self.groups, dtype=w.dtype, device=w.device)
        else:
            w2d = self.to_groups(w.detach())
            L.check_finite(w2d, f"initialising the weight quantizer{_where(layer_name)}")
            step = L.lsq_step_init(w2d, self.bits)
        r, c = L.uniform_multipliers(step, self.bits)
        if self.variant == "nmult":
            self.r = nn.Parameter(r)
            self.c = nn.Parameter(c)
        elif self.variant == "step":
            self.step = nn.Parameter(step)
            self.c = nn.Parameter(c)
        else:
            self.register_buffer("r", r)
            self.register_buffer("c", c)

    # -- levels --------------------------------------------------------------------------
    def multipliers(self) -> Tensor:
        """Effective bit multipliers ``(G, N)`` (differentiable)."""
        if self.variant == "step":
            pow2 = 2.0 ** torch.arange(self.bits, dtype=self.step.dtype, device=self.step.device)
            return self.step[:, None] * pow2
        return self.r

    def offset(self) -> Tensor:
        return self.c

    def levels(self) -> Tensor:
        """Level table ``(G, 2**N)`` indexed by code (differentiable in ``r`` and ``c``)."""
        return L.level_table(self.multipliers(), self.offset())

    # -- layout --------------------------------------------------------------------------
    def to_groups(self, w: Tensor) -> Tensor:
        """View ``w`` as ``(G, M)``: one row per output channel (or a single row)."""
        if not self.per_channel:
            return w.reshape(1, -1)
        return w.movedim(self.channel_dim, 0).reshape(w.shape[self.channel_dim], -1)

    def from_groups(self, w2d: Tensor, shape) -> Tensor:
        if not self.per_channel:
            return w2d.reshape(shape)
        moved = list(shape)
        moved.insert(0, moved.pop(self.channel_dim))
        return w2d.reshape(moved).movedim(0, self.channel_dim)

    def check_weight(self, w: Tensor) -> None:
        if self.per_channel and (w.dim() <= self.channel_dim
                                 or w.shape[self.channel_dim] != self.groups):
            raise ValueError(
                f"per-channel weight quantizer{_where(self.layer_name)} has {self.groups} "
                f"channels on axis {self.channel_dim} but got a weight of shape {tuple(w.shape)}")

    # -- quantization ----------------------------------------------------------------------
    def snap(self, w: Tensor) -> Tensor:
        """Each weight's nearest level (no gradient)."""
        self.check_weight(w)
        w2d = self.to_groups(w)
        L.check_finite(w2d, f"weights of {self.layer_name or 'layer'}")
        q, _ = L.nearest(w2d, self.levels())
        return self.from_groups(q, w.shape)

    def codes(self, w: Tensor) -> Tensor:
        """Each weight's N-bit code (int64, same shape as ``w``): its level is ``levels[code]``."""
        self.check_weight(w)
        w2d = self.to_groups(w)
        L.check_finite(w2d, f"weights of {self.layer_name or 'layer'}")
        _, codes = L.nearest(w2d, self.levels())
        return self.from_groups(codes, w.shape)

    def distance(self, w: Tensor) -> Tensor:
        """``sum_i min_q (w_i - q)^2`` over this layer (eq. 6/7 without the factors)."""
        self.check_weight(w)
        w2d = self.to_groups(w)
        L.check_finite(w2d, f"weights of {self.layer_name or 'layer'}")
        out = L.sq_distance_to_levels(w2d, self.levels())
        if not torch.isfinite(out):
            raise ValueError(f"levels of {self.layer_name or 'layer'} are not finite: r/c diverged")
        return out

    @property
    def uses_regularizer(self) -> bool:
        return self.mode in ("paper", "both")

    def nominal_scale(self) -> Tensor:
        return self.multipliers().detach().abs().min(dim=1).values

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        self.check_weight(x)
        if self.mode == "paper" and self.training:
            out = x  # the paper trains on full-precision weights; the regularizer pulls them in
        elif self.mode in ("ste", "both") and self.training:
            w2d = self.to_groups(x)
            L.check_finite(w2d, f"weights of {self.layer_name or 'layer'}")
            out = self.from_groups(L.snap_ste(w2d, self.levels()), x.shape)
        else:
            out = self.snap(x)
        scale = self.nominal_scale()
        if self.per_channel:
            shape = [1] * x.dim()
            shape[self.channel_dim] = self.groups
            scale = scale.view(shape)
        else:
            scale = scale.reshape(())
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return out, scale, zero, torch.tensor(float(self.bits), device=x.device)

    # -- state ---------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"bits": self.bits, "variant": self.variant, "mode": self.mode,
                "per_channel": self.per_channel, "groups": self.groups}

    def get_extra_state(self):
        return self.config_dict()

    def set_extra_state(self, state) -> None:
        mine = self.config_dict()
        for key in ("bits", "variant", "per_channel", "groups"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"checkpoint does not match the weight quantizer{_where(self.layer_name)}: "
                    f"{key} is {state[key]!r} in the checkpoint but {mine[key]!r} in the model. "
                    "Build the model with the checkpoint's configuration before loading it.")
        self.mode = check_choice(state.get("mode", self.mode), MODES, "forward mode")

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
                f"per_channel={self.per_channel}")


def _where(name: Optional[str]) -> str:
    return f" of {name}" if name else ""


class NMultWeightQuantProxy(WeightQuantProxyFromInjector):
    """Weight proxy of the N-multiplier family.

    Its own class so that export handlers can be matched on it: Brevitas' stock handler would
    export these weights as a uniform ``Quant`` node, silently wrong. The layer receives plain
    tensors (never an ``IntQuantTensor``), so that no downstream op consumes the nominal scale.
    """

    def __init__(self, quant_layer: nn.Module, quant_injector) -> None:
        super().__init__(quant_layer, quant_injector)
        self.skip_create_quant_tensor = True
        # A mode restored from a state dict must survive the next re-initialisation of the
        # quantizer from the injector: keep the injector in step after every load.
        self.register_load_state_dict_post_hook(NMultWeightQuantProxy._sync_injector)

    @staticmethod
    def _sync_injector(module, incompatible_keys) -> None:
        tq = module.tensor_quant
        if tq is not None and module.quant_injector.forward_mode != tq.mode:
            module.quant_injector = module.quant_injector.let(forward_mode=tq.mode)

    @property
    def input_view_impl(self):
        return Identity()

    def retrieve_attribute(self, attribute: str):
        if not self.is_quant_enabled:
            return None
        tq = self.tensor_quant
        if attribute == "bit_width":
            return torch.tensor(float(tq.bits))
        if attribute == "scale":
            return tq.nominal_scale()
        if attribute == "zero_point":
            return torch.zeros(())
        raise AttributeError(attribute)


class NMultWeightQuant(ExtendedInjector):
    """N-multiplier weights, per tensor: ``weight_quant=NMultWeightQuant, weight_bit_width=4``.

    Layer keyword arguments with the ``weight_`` prefix override the attributes below, e.g.
    ``weight_forward_mode="ste"`` or ``weight_scaling_per_output_channel=True``.
    """

    proxy_class = NMultWeightQuantProxy
    tensor_quant = NMultTensorQuant
    bit_width = 4
    quant_variant = "nmult"
    forward_mode = "paper"
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
