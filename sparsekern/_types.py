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
# in ``MEASURED_ACTIVATION_METHODS``). Subclasses count as their base.
MEASURED_ACTIVATIONS: dict[type, str] = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
MEASURED_ACTIVATION_FUNCTIONS: dict = {F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu",
                                       F.relu6: "relu6"}
MEASURED_ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}

# Elementwise activation modules: one output element from one input element, channels kept.
ELEMENTWISE_ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus,
)


def is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, BATCH_NORMS)


def measured_activation(module: nn.Module) -> str | None:
    """The report name of a measured activation module ("relu", "relu6"), or None."""
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
