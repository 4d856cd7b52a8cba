"""L2 versus decoupled weight decay, the two regularisers the paper compares, for a parameter
theta and lr_t = lr_0 * schedule(t):

  L2 (``L2Regularizer``): the penalty enters the gradient. It is torch's ``weight_decay=lambda``
       on the optimizer, so g_t = grad + lambda * theta and an adaptive optimizer rescales the
       penalty together with the gradient (Adam divides it by sqrt(v_t)).
       For SGD: theta <- theta - lr_t * (grad + lambda * theta).

  WD (``DecoupledWeightDecay``): the optimizer steps on the plain gradient, then
           theta <- theta * (1 - lambda * lr_t / lr_0)
       so the per-step decay is lambda at the initial learning rate and follows the learning-rate
       schedule, as in the paper ("adjusted with the same scaling schedule as the learning rate").
       With Adam this is AdamW with ``weight_decay = lambda / lr_0`` except for the order: AdamW
       decays *before* its update, we decay *after* it, so one step differs by exactly
       lambda_t * lr_t * u_t (u_t the Adam direction m_hat / (sqrt(v_hat) + eps)), a second-order term.

Neither synchronises with the device: the decay factor is a Python float computed from the
host-side learning rate.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from sparsekern.regularize.base import Regularizer, check_strength


class L2Regularizer(Regularizer):
    """Penalty lambda/2 * ||theta||^2 in the loss, i.e. lambda * theta in the gradient: the
    ``weight_decay`` the optimizer gets for the regularised parameters (nothing to do after a step)."""

    def __init__(self, strength: float):
        self.strength = check_strength(strength)

    @property
    def weight_decay(self) -> float:  # type: ignore[override]
        return self.strength


class DecoupledWeightDecay(Regularizer):
    """theta <- theta * (1 - lambda * lr_t / lr_0) after each step, for every one of ``params``
    (the decay follows the learning-rate schedule; ``lr0`` is the initial learning rate)."""

    def __init__(self, params: Iterable[nn.Parameter], strength: float, lr0: float):
        self.params = list(params)
        self.strength = check_strength(strength)
        if not (isinstance(lr0, (int, float)) and lr0 > 0):
            raise ValueError(f"DecoupledWeightDecay: lr0 must be a number > 0, got {lr0!r}")
        self.lr0 = lr0

    @torch.no_grad()
    def step(self, lr=None) -> None:
        if lr is None:
            raise ValueError("DecoupledWeightDecay.step needs this step's learning rate")
        if self.params:
            torch._foreach_mul_(self.params, 1.0 - self.strength * lr / self.lr0)
