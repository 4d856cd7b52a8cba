"""The proximal regularisers: their common base and lasso / group-lasso / ridge (the L-P, GL-P
and R-P rows of the Split LBI tables); CGES (cges.py) shares the base:

    reg = Lasso(model, strength)          # or GroupLasso, Ridge, CGES, NoRegularizer
    for x, y in loader:
        loss(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        reg.step(optimizer)               # proximal step with each weight's current lr
    reg.sparsity()                        # per layer: fraction of zero weights / groups / filters

They implement the regulariser interface of base.py. `step(lr)` is a proximal step applied after
any torch optimizer's step (SGD, Adam, ...): it touches only Linear / Conv weights (never biases
or BatchNorm), treats all groups of a layer in one vectorised op, and reads no value back to the
host (no `.item()`), so it does not synchronise a GPU stream. `penalty()` is the same penalty as a
differentiable scalar, for logging or for adding to the loss instead of taking prox steps.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from sparsekern._deprecated import deprecated_names
from sparsekern.regularize import base
from sparsekern.regularize.base import LearningRate, check_strength
from sparsekern.regularize.groups import group_rows, sparse_weights, write_rows_back
from sparsekern.regularize.proximal import group_lasso_prox, ridge_prox, soft_threshold


class ProximalRegularizer(base.Regularizer):
    """Base of the prox regularisers: which weights, which lr, and the sparsity report.

    `model_or_params`: an nn.Module (its Linear / Conv weights) or an iterable of tensors (those
    with >= 2 dims). `strength`: lambda >= 0. `group_kind`: "input" or "filter" ("output"),
    the groups `sparsity()` counts (and that group penalties act on). `layers`: module names to
    restrict to. `optimizer`: where `step()` without an argument reads the lr from.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[torch.Tensor],
        strength: float,
        group_kind: str = "input",
        layers: Iterable[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.strength = check_strength(strength)
        self.group_kind = group_kind
        self.weights = sparse_weights(model_or_params, layers)
        for name, weight in self.weights:
            group_rows(weight, group_kind)  # validates the kind and the weight up front
        self.optimizer = optimizer

    @property
    def names(self) -> list[str]:
        """Names of the regularised weights, in layer order."""
        return [name for name, _ in self.weights]

    @torch.no_grad()
    def step(self, lr: LearningRate | None = None) -> None:
        """One proximal step on every regularised weight, after the optimizer's own step.

        `lr`: a number, a 0-dim tensor, or a torch optimizer (then each weight uses the lr of
        the param group holding it, so schedulers are followed). Without it, the optimizer given
        to the constructor is used.
        """
        for index, ((_, weight), weight_lr) in enumerate(zip(self.weights, self._lrs(lr))):
            self._prox(index, weight, weight_lr)

    def _prox(self, index: int, weight: torch.Tensor, lr: float | torch.Tensor) -> None:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor:
        """The penalty as a differentiable scalar (sum over the regularised weights)."""
        return sum(self._penalty(i, w) for i, (_, w) in enumerate(self.weights))

    def _penalty(self, index: int, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _lrs(self, lr: LearningRate | None) -> list[float | torch.Tensor]:
        """The learning rate of each regularised weight, in order."""
        source = self.optimizer if lr is None else lr
        if source is None:
            raise ValueError("step() needs the learning rate (or an optimizer to read it from)")
        if isinstance(source, torch.optim.Optimizer):
            lr_of = {id(p): group["lr"] for group in source.param_groups for p in group["params"]}
            missing = [name for name, weight in self.weights if id(weight) not in lr_of]
            if missing:
                raise ValueError(f"{missing} are not optimised by the given optimizer, so they have no lr")
            return [lr_of[id(weight)] for _, weight in self.weights]
        if isinstance(source, torch.Tensor):
            if source.dim() != 0:
                raise ValueError(f"lr must be a number or a 0-dim tensor, got shape {tuple(source.shape)}")
        elif not (isinstance(source, (int, float)) and math.isfinite(source) and source >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {source!r}")
        return [source] * len(self.weights)

    @torch.no_grad()
    def sparsity(self) -> dict[str, dict[str, float]]:
        """Per regularised weight: fraction of exactly-zero weights, groups and filters.

        {"weights": ..., "groups": ..., "filters": ...}; a group / filter counts as zero when
        all its weights are 0 (groups of this regulariser's `group_kind`; a filter is an output
        unit, a row of the (out, ...) weight). Reads values back to the host: call it for
        reports, not every step.
        """
        report = {}
        for name, weight in self.weights:
            report[name] = {
                "weights": weight.eq(0).float().mean().item(),
                "groups": group_rows(weight, self.group_kind).eq(0).all(dim=1).float().mean().item(),
                "filters": group_rows(weight, "filter").eq(0).all(dim=1).float().mean().item(),
            }
        return report

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength}, layers={self.names})"


class NoRegularizer(ProximalRegularizer):
    """`--reg none`: the same interface (and sparsity report), a step that changes nothing."""

    def __init__(self, model_or_params, strength=0.0, group_kind="input", layers=None, optimizer=None):
        super().__init__(model_or_params, strength, group_kind, layers, optimizer)

    def _prox(self, index, weight, lr):
        pass

    def _penalty(self, index, weight):
        return weight.new_zeros(())


class Lasso(ProximalRegularizer):
    """L1 penalty `strength * sum |w|`; prox = soft threshold at `lr * strength` (L-P)."""

    def _prox(self, index, weight, lr):
        soft_threshold(weight, lr * self.strength, inplace=True)

    def _penalty(self, index, weight):
        return self.strength * weight.abs().sum()


class GroupLasso(ProximalRegularizer):
    """Group lasso `strength * sum_g ||w_g||_2` (GL-P); prox = group shrink at `lr * strength`.

    `group_kind` defaults to "filter": whole output filters (conv) / output units (Linear) are
    driven to zero, which is what a filter-pruning table ranks; "input" groups as in CGES.
    """

    def __init__(self, model_or_params, strength, group_kind="filter", layers=None, optimizer=None):
        super().__init__(model_or_params, strength, group_kind, layers, optimizer)

    def _prox(self, index, weight, lr):
        rows = group_rows(weight, self.group_kind)
        group_lasso_prox(rows, lr * self.strength, inplace=True)
        write_rows_back(weight, rows, self.group_kind)

    def _penalty(self, index, weight):
        return self.strength * torch.linalg.vector_norm(group_rows(weight, self.group_kind), dim=1).sum()


class Ridge(ProximalRegularizer):
    """Ridge `strength/2 * ||w||_2^2` (R-P); prox = exact shrink `w / (1 + lr * strength)`.

    As a prox step after the optimizer this is decoupled weight decay; for the coupled L2 form
    (the penalty's gradient rescaled by an adaptive optimizer) add `penalty()` to the loss or use
    the optimizer's `weight_decay` instead.
    """

    def _prox(self, index, weight, lr):
        ridge_prox(weight, lr * self.strength, inplace=True)

    def _penalty(self, index, weight):
        return 0.5 * self.strength * weight.pow(2).sum()


# The prox base was called Regularizer before that name became the interface of every regulariser.
__getattr__ = deprecated_names(__name__, {"Regularizer": ProximalRegularizer})
