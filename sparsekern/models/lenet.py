"""LeNet-5 with the layer names of LeCun et al. 1998, as pruned in SCIENCE.md section 4.

    c1  Conv2d(in_channels, 6, 5x5, padding p) -> relu1 -> s2 MaxPool 2x2
    c3  Conv2d(6, 16, 5x5)                     -> relu3 -> s4 MaxPool 2x2
    c5  Conv2d(16, 120, 5x5)  (sees a 5x5 map, outputs 1x1) -> relu5
    f6  Linear(120, 84)                        -> relu6
    output  Linear(84, num_classes)

``model.c5`` and ``model.f6`` are plain attributes, so pruning code can address them directly.
Activations are ReLU and subsampling is max-pooling (the modern reading used by the pruning
papers, not the original scaled-tanh / trainable average pooling).

The network is built for one input size ``image_size`` (default 28): the first conv gets
padding ``p = (33 - image_size) // 2`` so that c5 sees exactly 5x5 -- ``p = 2`` for 28x28
(MNIST-style, as the classic 32x32 LeNet sees a 28x28 digit padded by 2) and ``p = 0`` for 32x32.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsekern.models.basicnet import check_positive_int


@torch.fx.wrap
def _check_input_size(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Reject inputs of the wrong size (otherwise c5 would not end at 1x1 and f6 would fail with a
    shape error). Wrapped for torch.fx, so the model stays traceable for surgery and analysis."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"LeNet5 was built for (N, C, {image_size}, {image_size}) inputs, "
            f"got shape {tuple(x.shape)}; pass image_size= to the constructor"
        )
    return x

# c1 (5x5), pool, c3 (5x5), pool, c5 (5x5) takes a 32x32 (or 33x33) map to 1x1.
_NATIVE_SIZE = 33


class LeNet5(nn.Module):
    """LeNet-5 for ``image_size`` x ``image_size`` inputs (at most 33); c5 and f6 are attributes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        check_positive_int(image_size, "image_size")
        if image_size > _NATIVE_SIZE:
            raise ValueError(
                f"LeNet5 takes inputs of at most 32x32 (c5 must see a 5x5 map), got image_size={image_size}"
            )
        self.image_size = image_size
        self.c1 = nn.Conv2d(in_channels, 6, 5, padding=(_NATIVE_SIZE - image_size) // 2)
        self.relu1 = nn.ReLU()
        self.s2 = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(6, 16, 5)
        self.relu3 = nn.ReLU()
        self.s4 = nn.MaxPool2d(2)
        self.c5 = nn.Conv2d(16, 120, 5)
        self.relu5 = nn.ReLU()
        self.f6 = nn.Linear(120, 84)
        self.relu6 = nn.ReLU()
        self.output = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_input_size(x, self.image_size)
        x = self.s2(self.relu1(self.c1(x)))
        x = self.s4(self.relu3(self.c3(x)))
        x = torch.flatten(self.relu5(self.c5(x)), 1)
        return self.output(self.relu6(self.f6(x)))
