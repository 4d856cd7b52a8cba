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
