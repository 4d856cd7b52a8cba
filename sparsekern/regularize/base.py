"""The one interface of a regulariser, the one the training loop drives.

    reg = L2Regularizer(params, 5e-4)        # or DecoupledWeightDecay, SlimmingRegularizer, CGES, Lasso...
    groups = [{"params": params, "weight_decay": reg.weight_decay}]
    ...; optimizer.step(); reg.step(lr)       # after every optimizer step, with that step's lr

- ``weight_decay``: the coupled L2 coefficient the optimizer gets for the regularised parameters
  (the penalty enters the gradient, rescaled with it by adaptive optimizers); 0 for every other kind.
- ``step(lr)``: what the regulariser does after each ``optimizer.step()`` (decoupled decay, a
  proximal step); nothing by default.
- ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint must keep (nothing by default).

The base class is itself the "no regularisation" of ``--reg none``. Regularisers with a penalty
to report also have ``penalty()`` (a differentiable scalar); the proximal ones ``sparsity()``.
"""
from __future__ import annotations

import math

import torch

LearningRate = float | torch.Tensor | torch.optim.Optimizer


def check_strength(strength) -> float:
    """``strength`` as a float, or ValueError unless it is a finite number >= 0."""
    if isinstance(strength, bool) or not (isinstance(strength, (int, float)) and math.isfinite(strength)
                                          and strength >= 0):
        raise ValueError(f"regularisation strength must be a finite number >= 0, got {strength!r}")
    return float(strength)


class Regularizer:
    """No regularisation; the interface every regulariser implements (see the module docstring)."""

    weight_decay = 0.0

    def step(self, lr: LearningRate | None = None) -> None:
        """Called after each optimizer step with that step's learning rate."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
