"""The layer kinds sparsekern reasons about, in one table (a leaf: imports torch only).

The tracker (``stats.features``), the channel graph and BN folding (``prune``) and the fused
kernels (``ops.bn_relu``) all ask these, so a layer one of them accepts is one the others know:
a SyncBatchNorm the tracker measures is a BatchNorm to surgery too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A BatchNorm: every torch ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, the Lazy ones once
# initialised). In eval mode each is the per-channel affine gamma * (x - mean) / sqrt(var + eps) + beta,
# which is all folding, surgery and the fused kernels rely on.
BATCH_NORMS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)

# Layers that read every input channel (groups == 1) or a group of them, and make new channels.
# Not the transposed convs: their weight is (in, out / groups, ...), the other way round.
CONVS: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Every torch convolution, the transposed ones included: each makes its output channels, so for
# the tracker each is the layer that produces a feature (surgery's CONVS is narrower).
ALL_CONVS: tuple[type, ...] = (nn.modules.conv._ConvNd,)
LINEARS: tuple[type, ...] = (nn.Linear,)
PRODUCERS: tuple[type, ...] = CONVS + LINEARS

# Activations the tracker measures, with their names in reports (module forms; their functional
# forms, in-place ones included, are in ``MEASURED_ACTIVATION_FUNCTIONS``, their Tensor methods
# in ``MEASURED_ACTIVATION_METHODS``). Subclasses count as their base; the first match wins, so
# ReLU6 (a Hardtanh subclass) comes before Hardtanh. ``register_activation`` adds a class; timm's
# own activation classes are registered on first use. Gates (Sigmoid, Hardsigmoid, Tanh) are not
# features: they scale another tensor rather than make a feature map.
MEASURED_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.Hardswish: "hardswish", nn.SiLU: "silu",
    nn.GELU: "gelu", nn.Mish: "mish", nn.ELU: "elu", nn.CELU: "celu", nn.SELU: "selu", nn.Hardtanh: "hardtanh",
    nn.PReLU: "prelu", nn.Softplus: "softplus",
}
MEASURED_ACTIVATION_FUNCTIONS: dict = {
    F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
    F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", F.hardswish: "hardswish", F.silu: "silu",
    F.gelu: "gelu", F.mish: "mish", F.elu: "elu", F.elu_: "elu", F.celu: "celu", F.celu_: "celu",
    torch.celu: "celu", torch.celu_: "celu", F.selu: "selu", F.selu_: "selu", torch.selu: "selu",
    torch.selu_: "selu", F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh", F.softplus: "softplus",
}
MEASURED_ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}

# How a tracker applies a functional activation itself (on a copy of its producer's output),
# and the names of the functional's arguments after the input, in order (positional arguments
# of a call are bound to these names; "inplace" is dropped: the copy is the tracker's own).
ACTIVATION_FUNCTIONS: dict[str, object] = {
    "relu": torch.relu, "relu6": F.relu6, "leaky_relu": F.leaky_relu, "hardswish": F.hardswish, "silu": F.silu,
    "gelu": F.gelu, "mish": F.mish, "elu": F.elu, "celu": F.celu, "selu": F.selu, "hardtanh": F.hardtanh,
    "softplus": F.softplus,
}
ACTIVATION_PARAMETERS: dict[str, tuple[str, ...]] = {
    "relu": ("inplace",), "relu6": ("inplace",), "leaky_relu": ("negative_slope", "inplace"),
    "hardswish": ("inplace",), "silu": ("inplace",), "gelu": ("approximate",), "mish": ("inplace",),
    "elu": ("alpha", "inplace"), "celu": ("alpha", "inplace"), "selu": ("inplace",),
    "hardtanh": ("min_val", "max_val", "inplace"), "softplus": ("beta", "threshold"),
}

# Elementwise activation modules: one output element from one input element, channels kept.
ELEMENTWISE_ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus,
)


def is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, BATCH_NORMS)


def register_activation(cls: type, name: str) -> None:
    """Declare module class ``cls`` an elementwise activation the tracker measures, called
    ``name`` in reports (e.g. ``register_activation(MySwish, "silu")``). Its features are hooked
    on the module's output, so no functional form is needed."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_activation: {cls!r} is not an nn.Module subclass")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_activation: name must be a short identifier like 'silu', got {name!r}")
    MEASURED_ACTIVATIONS[cls] = name


def activation_names() -> frozenset:
    """Every activation name a feature may carry (built-in and registered)."""
    return frozenset(MEASURED_ACTIVATIONS.values()) | frozenset(ACTIVATION_FUNCTIONS)


# timm's own activation classes (timm.layers.activations / activations_me), by report name.
_TIMM_ACTIVATIONS = {
    "GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "Swish": "silu", "Mish": "mish",
    "HardSwish": "hardswish", "HardMish": "hard_mish", "SwishMe": "silu", "MishMe": "mish",
    "HardSwishMe": "hardswish", "HardMishMe": "hard_mish",
}
_TIMM_ACTIVATIONS_CHECKED = False


def _register_timm_activations() -> None:
    global _TIMM_ACTIVATIONS_CHECKED
    if _TIMM_ACTIVATIONS_CHECKED:
        return
    _TIMM_ACTIVATIONS_CHECKED = True
    for module_name in ("timm.layers.activations", "timm.layers.activations_me"):
        try:
            module = __import__(module_name, fromlist=["_"])  # optional dependency
        except Exception:
            continue
        for cls_name, name in _TIMM_ACTIVATIONS.items():
            cls = getattr(module, cls_name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                MEASURED_ACTIVATIONS.setdefault(cls, name)


def measured_activation(module: nn.Module) -> str | None:
    """The report name of a measured activation module ("relu", "silu", "gelu", ...), or None."""
    if type(module).__module__.startswith("timm"):
        _register_timm_activations()
    for cls, name in MEASURED_ACTIVATIONS.items():
        if isinstance(module, cls):
            return name
    return None


# --- norm-then-activation modules ----------------------------------------------------------
# Some libraries put the activation inside the norm module (timm's ``BatchNormAct2d``: a
# BatchNorm2d subclass whose forward is batch_norm -> drop -> act). For the tracker such a module
# is a feature (its output is the activation's); for surgery it is a BatchNorm followed by an
# elementwise activation. ``register_norm_act`` declares one such class; timm's are registered
# on first use when timm is importable.
_NORM_ACT: dict[type, object] = {}
_TIMM_CHECKED = False


def register_norm_act(cls: type, activation=lambda m: m.act) -> None:
    """Declare ``cls`` a "BatchNorm then activation" module.

    ``cls`` must subclass a torch BatchNorm (its parameters and running statistics are the
    norm's); in eval mode its forward must equal ``activation(module)(batch_norm(x))``, where
    ``activation(module)`` returns the elementwise activation module (by default ``module.act``).
    Anything between the two must be an identity in eval mode (timm's ``drop``).
    """
    if not (isinstance(cls, type) and issubclass(cls, BATCH_NORMS)):
        raise TypeError(f"register_norm_act: {cls!r} is not a subclass of a torch BatchNorm")
    if not callable(activation):
        raise TypeError("register_norm_act: activation must be a function module -> activation module")
    _NORM_ACT[cls] = activation


def _register_timm() -> None:
    global _TIMM_CHECKED
    if _TIMM_CHECKED:
        return
    _TIMM_CHECKED = True
    try:
        from timm.layers import norm_act  # optional dependency
    except Exception:  # timm absent (or broken): nothing to register
        return
    for name in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"):
        cls = getattr(norm_act, name, None)
        if isinstance(cls, type) and issubclass(cls, BATCH_NORMS):
            _NORM_ACT.setdefault(cls, lambda m: m.act)


def norm_act_activation(module: nn.Module) -> nn.Module | None:
    """The activation module inside a registered norm-then-activation module, else None
    (also None for a plain BatchNorm)."""
    if not isinstance(module, BATCH_NORMS):
        return None
    if type(module).__module__.startswith("timm"):
        _register_timm()
    for cls in type(module).__mro__:
        if cls in _NORM_ACT:
            return _NORM_ACT[cls](module)
    return None
