"""Network Slimming's penalty (Liu et al. 2017, "Learning Efficient Convolutional Networks through
Network Slimming"): an L1 penalty ``strength * sum |gamma|`` on every BN scale gamma, applied as its
subgradient ``strength * sign(gamma)`` added to gamma's gradient (strength typically 1e-5..1e-4).

- :class:`SlimmingPenalty`: the penalty on its own, for any training loop (a call per step or
  gradient hooks).
- :class:`SlimmingRegularizer`: the same as a :class:`~sparsekern.regularize.base.Regularizer`,
  ``--reg slimming --reg-strength 1e-4`` of ``sparsekern train``: the penalty replaces L2, it is
  the only regulariser of such a run.

Pruning a slimming-trained network (one global |gamma| threshold) is
``sparsekern.prune.baselines.slimming_plan``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern._types import BATCH_NORMS
from sparsekern.regularize.base import Regularizer


class SlimmingPenalty:
    """The L1 penalty ``strength * sum |gamma|`` over every BN scale of ``model``, applied as its
    subgradient ``strength * sign(gamma)`` added to each gamma's gradient (as Liu et al. do).

    Two ways to use it: call :meth:`step` after ``loss.backward()`` and before
    ``optimizer.step()``; or :meth:`attach` it once, and a gradient hook on every gamma adds the
    term during each backward (nothing to call in the loop; :meth:`remove` undoes it). Either way
    an adaptive optimizer sees the penalty as part of the gradient.
    """

    def __init__(self, model: nn.Module, strength: float):
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength > 0):
            raise ValueError(f"SlimmingPenalty: strength must be a finite number > 0, got {strength!r}")
        self.strength = float(strength)
        self.gammas = [m.weight for m in model.modules() if isinstance(m, BATCH_NORMS) and m.weight is not None]
        if not self.gammas:
            raise ValueError(f"SlimmingPenalty: {type(model).__name__} has no BatchNorm with an affine scale")
        self._handles = []

    def penalty(self) -> torch.Tensor:
        """The loss term ``strength * sum |gamma|`` (for logging; its gradient is what is added)."""
        return self.strength * sum(g.abs().sum() for g in self.gammas)

    @torch.no_grad()
    def step(self) -> None:
        """Add ``strength * sign(gamma)`` to the ``.grad`` of every gamma that has one."""
        for gamma in self.gammas:
            if gamma.grad is not None:
                gamma.grad.add_(torch.sign(gamma), alpha=self.strength)

    def attach(self) -> "SlimmingPenalty":
        """Register the gradient hooks (once); returns self."""
        if not self._handles:
            for gamma in self.gammas:
                self._handles.append(gamma.register_hook(
                    lambda grad, gamma=gamma: grad + self.strength * torch.sign(gamma.detach())
                ))
        return self

    def remove(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class SlimmingRegularizer(Regularizer):
    """``reg="slimming"`` of the training loop: a :class:`SlimmingPenalty` of ``strength``
    attached to the model's gammas (it acts during backward, so nothing happens after a step);
    no L2 on any parameter."""

    def __init__(self, model: nn.Module, strength: float):
        self.penalty = SlimmingPenalty(model, strength).attach()
