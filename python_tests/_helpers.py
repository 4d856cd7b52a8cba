"""Helpers shared by the test files (imported as ``from _helpers import ...``; pytest puts this
folder on sys.path). One copy of each, so the tests of one behaviour set it up the same way."""
from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial eval-mode BN statistics and affine, so constants after a BN are nonzero."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.5
            m.running_mean = torch.randn(c, generator=g) * 0.3
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model


def make_constant(bn: nn.Module, channels, beta: float) -> None:
    """gamma = 0: the BN outputs exactly beta on these channels (dead after ReLU if beta < 0)."""
    bn.weight.data[channels] = 0.0
    bn.bias.data[channels] = beta
