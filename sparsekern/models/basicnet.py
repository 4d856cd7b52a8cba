"""BasicNet: the seven-layer Conv -> BN -> ReLU network of Mehta et al. (CVPR 2019).

Layout (layer names as ``named_modules()`` reports them)::

    features.c1 .. features.c7      ConvBNReLU units: .conv (3x3, padding 1, no bias), .bn, .relu
    features.pool1/pool2/pool3      2x2 max-pool after C2, C4 and C6
    pool                            global average pool
    classifier                      Linear(C7 width -> num_classes)

So the conv of layer C3 is ``features.c3.conv``, its BatchNorm ``features.c3.bn`` and the
feature map the sparsity definitions look at (after BN + ReLU) is the output of
``features.c3.relu`` (equivalently, of the unit ``features.c3``).

Spatial sizes: 28x28 inputs (Fashion-MNIST) give 28 -> 14 -> 7 -> 3 after the three pools,
32x32 inputs (CIFAR) give 32 -> 16 -> 8 -> 4; the global pool makes the head size-agnostic.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

DEFAULT_WIDTHS = (64, 128, 128, 256, 256, 512, 512)


def scaled_width(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by the width multiplier: round half up, at least 1.

    Half-up rounding (not Python's banker's rounding) so that e.g. 0.5 * 5 gives 3.
    """
    if not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width!r}")
    return max(1, int(channels * width + 0.5))


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, kept as three named children.

    Separate children let hooks read the BN output and the post-ReLU map, and let surgery
    replace ``conv`` / ``bn`` individually. The ReLU is not in-place: an in-place ReLU would
    overwrite the tensor a forward hook on ``bn`` has just been handed.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def check_positive_int(value, what: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


class BasicNet(nn.Module):
    """Seven 3x3 Conv-BN-ReLU layers C1..C7, max-pool after C2, C4, C6, global avg pool, Linear.

    ``width`` multiplies every conv width (see :func:`scaled_width`); ``widths`` gives the
    unscaled widths of C1..C7 (any length >= 1 works; a pool follows every second layer
    except the last one). The final widths are in ``self.widths``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: float = 1.0,
        widths: Sequence[int] = DEFAULT_WIDTHS,
    ):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must name at least one conv layer")
        for i, w in enumerate(widths):
            check_positive_int(w, f"widths[{i}]")
        self.widths = tuple(scaled_width(w, width) for w in widths)

        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        previous = in_channels
        for index, out_channels in enumerate(self.widths, start=1):
            layers[f"c{index}"] = ConvBNReLU(previous, out_channels)
            if index % 2 == 0 and index < len(self.widths):
                layers[f"pool{index // 2}"] = nn.MaxPool2d(2)
            previous = out_channels
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
