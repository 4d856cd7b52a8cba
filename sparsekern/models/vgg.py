"""CIFAR-style VGG with BatchNorm (configs A = VGG-11 and D = VGG-16 of Simonyan & Zisserman).

Layout (layer names as ``named_modules()`` reports them)::

    features.c1 .. features.cK      ConvBNReLU units (.conv 3x3 padding 1 no bias, .bn, .relu)
    features.pool1 .. pool5         2x2 max-pools, ceil_mode=True
    pool                            global average pool
    classifier                      one Linear(last width -> num_classes)

The classifier is a single Linear layer, as in the CIFAR VGG variants used by Network
Slimming (Liu et al. 2017) and by the implicit-sparsity paper's harvesting experiments.

Small inputs: five stride-2 pools take 32x32 to 1x1, but 28x28 would reach 0x0 with floor
pooling (28 -> 14 -> 7 -> 3 -> 1 -> 0). The pools therefore use ``ceil_mode=True``: 28x28 goes
28 -> 14 -> 7 -> 4 -> 2 -> 1 (the odd 7x7 map's last row/column is pooled on its own) and a
1x1 map stays 1x1. On 32x32 (all sizes even) ceil mode is identical to the standard pools.
The global average pool is the identity on a 1x1 map and keeps the head valid for larger
inputs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Union

import torch
from torch import nn

from sparsekern.models.basicnet import ConvBNReLU, check_positive_int, scaled_width

POOL = "M"
CONFIGS = {
    "A": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "D": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
}


class VGG(nn.Module):
    """VGG feature stack from ``config`` (widths and ``"M"`` for a pool) + a Linear classifier.

    ``config`` is a key of :data:`CONFIGS` or a sequence; ``width`` scales every conv width
    (see :func:`sparsekern.models.basicnet.scaled_width`). Final widths are in ``self.widths``.
    """

    def __init__(
        self,
        config: Union[str, Sequence[Union[int, str]]],
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
    ):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        if isinstance(config, str):
            if config not in CONFIGS:
                raise ValueError(f"unknown VGG config {config!r}; choose from {sorted(CONFIGS)}")
            config = CONFIGS[config]
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        widths = []
        pools = 0
        previous = in_channels
        for item in config:
            if item == POOL:
                pools += 1
                layers[f"pool{pools}"] = nn.MaxPool2d(2, ceil_mode=True)
                continue
            out_channels = scaled_width(check_positive_int(item, "VGG config width"), width)
            widths.append(out_channels)
            layers[f"c{len(widths)}"] = ConvBNReLU(previous, out_channels)
            previous = out_channels
        if not widths:
            raise ValueError("a VGG config needs at least one conv layer")
        self.widths = tuple(widths)
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg11_bn(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> VGG:
    """CIFAR-style VGG-11 (config A, 8 conv layers) with BatchNorm."""
    return VGG("A", in_channels=in_channels, num_classes=num_classes, width=width)


def vgg16_bn(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> VGG:
    """CIFAR-style VGG-16 (config D, 13 conv layers) with BatchNorm."""
    return VGG("D", in_channels=in_channels, num_classes=num_classes, width=width)
