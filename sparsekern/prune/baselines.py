"""Explicit-pruning baselines to compare implicit sparsity against, at a matched keep ratio.

- **L1-norm filter pruning** (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): rank
  the filters of each layer by the L1 norm of their weights, keep the best of each layer,
  fine-tune. :func:`l1_norm_plan`.
- **Network Slimming** (Liu et al. 2017, "Learning Efficient Convolutional Networks through
  Network Slimming"): train with an L1 penalty on every BN scale gamma (its subgradient
  ``strength * sign(gamma)`` added to gamma's gradient, strength typically 1e-5..1e-4), then
  remove the channels under one *global* threshold on |gamma| chosen to reach the keep ratio,
  then fine-tune. :class:`SlimmingPenalty` (training), :func:`slimming_threshold` /
  :func:`slimming_plan` (pruning). In a ``sparsekern train`` run: ``--reg slimming
  --reg-strength 1e-4`` (:class:`SlimmingRegularizer`; the penalty replaces L2, it is the only
  regulariser of such a run).
- :func:`fine_tune`: a few optimizer steps on a pruned model.

Both plans cover the same layers: every Conv/Linear followed by a BN in its unit (the Conv-BN-ReLU
units whose filters implicit sparsity kills), never the classifier, whose outputs are the logits.
The plans are lossy (``exact = False``): surgery verifies that the pruned model equals the
original with the removed channels zeroed, not the original itself.
"""
from __future__ import annotations

import math
from typing import Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.prune.plan import LayerPlan, PrunePlan, bn_gamma_scores, filter_l1_scores
from sparsekern.prune.surgery import class_path
from sparsekern.train.optim import Regularizer

_BN_TYPES = nn.modules.batchnorm._BatchNorm


def unit_layers(model: nn.Module) -> list:
    """Names of the Conv/Linear layers followed by a BN in their unit: what the baselines prune."""
    return list(bn_gamma_scores(model))


# --- L1-norm filter pruning ----------------------------------------------------------------------


def l1_norm_plan(model: nn.Module, keep: Union[float, Mapping[str, int]], *, input_shape=None) -> PrunePlan:
    """Li et al.'s plan: per layer, keep the filters with the largest L1 weight norm.

    keep: a ratio in (0, 1] kept in every unit layer (``round(keep * channels)``, at least 1), or
    ``{layer: number of filters kept}`` to give each layer its own count (e.g. the per-layer counts
    implicit sparsity left, so both pruned networks have the same shape). Layers missing from the
    mapping keep all their filters. Ties keep the lower channel index.
    """
    layers = unit_layers(model)
    scores = {name: s for name, s in filter_l1_scores(model).items() if name in layers}
    if not isinstance(keep, Mapping):
        plan = PrunePlan.from_scores(model, scores, keep, scope="layer", input_shape=input_shape)
        plan.source = f"l1_norm(keep_ratio={keep:g})"
        return plan
    unknown = sorted(set(keep) - set(scores))
    if unknown:
        raise ValueError(f"l1_norm_plan: {unknown} are not prunable unit layers of {type(model).__name__} "
                         f"(those are {layers})")
    plan_layers = {}
    for name, s in scores.items():
        count = keep.get(name, s.numel())
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= s.numel():
            raise ValueError(f"l1_norm_plan: layer {name!r} has {s.numel()} filters; cannot keep {count!r}")
        plan_layers[name] = LayerPlan(channels=s.numel(),
                                      kept=torch.argsort(s, descending=True, stable=True)[:count].tolist())
    plan = PrunePlan(layers=plan_layers, exact=False, model_class=class_path(model), source="l1_norm(per-layer counts)")
    if input_shape is not None:
        plan.input_shape = tuple(int(d) for d in input_shape)
    return plan


# --- Network Slimming ----------------------------------------------------------------------------


def slimming_threshold(model: nn.Module, keep_ratio: float) -> float:
    """The global |gamma| threshold of Network Slimming: the smallest |gamma| among the
    ``round(keep_ratio * total)`` largest over all unit BNs (channels at or above it are kept)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    scores = bn_gamma_scores(model)
    if not scores:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear followed by a BatchNorm with a scale: "
                         "Network Slimming needs BN gammas")
    flat = torch.cat(list(scores.values()))
    k = max(1, int(round(keep_ratio * flat.numel())))
    return float(torch.topk(flat, k).values[-1])


def slimming_plan(model: nn.Module, keep_ratio: float, *, input_shape=None) -> PrunePlan:
    """Liu et al.'s plan: keep the ``round(keep_ratio * total)`` channels with the largest |gamma|
    over all unit BNs (one global threshold, :func:`slimming_threshold`); every layer keeps at
    least its best channel, so a tiny ratio can keep slightly more."""
    scores = bn_gamma_scores(model)
    if not scores:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear followed by a BatchNorm with a scale: "
                         "Network Slimming needs BN gammas")
    plan = PrunePlan.from_scores(model, scores, keep_ratio, scope="global", input_shape=input_shape)
    plan.source = f"network_slimming(keep_ratio={keep_ratio:g})"
    return plan


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
        self.gammas = [m.weight for m in model.modules() if isinstance(m, _BN_TYPES) and m.weight is not None]
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
    """``reg="slimming"`` of the training loop: a :class:`SlimmingPenalty` of strength
    ``reg_strength`` attached to the model's gammas; no L2 on any parameter."""

    def __init__(self, config, model: nn.Module, params: list):
        super().__init__(config, model, params)
        self.penalty = SlimmingPenalty(model, config.reg_strength).attach()


# --- fine-tuning ---------------------------------------------------------------------------------

_FINE_TUNE_OPTIMIZERS = ("adam", "sgd")


def fine_tune(model: nn.Module, loader, steps: int, lr: float, *, optimizer: str = "adam",
              momentum: float = 0.9, weight_decay: float = 0.0) -> float:
    """Train ``model`` in place for ``steps`` mini-batches of ``loader`` (cycled) with cross-entropy;
    return the mean training loss over those steps. The model is left in eval mode.

    optimizer: "adam" or "sgd" (with ``momentum``; the baselines' papers fine-tune with SGD).
    weight_decay: L2 coefficient, 0 by default: L2 under Adam is what kills filters in the first
    place. Batches go to the model's device. Raises TrainingDivergedError on a non-finite loss.
    """
    from sparsekern.train.loop import TrainingDivergedError

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fine_tune: steps must be an int >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"fine_tune: lr must be a finite number > 0, got {lr!r}")
    if optimizer not in _FINE_TUNE_OPTIMIZERS:
        raise ValueError(f"fine_tune: optimizer must be one of {_FINE_TUNE_OPTIMIZERS}, got {optimizer!r}")
    if steps == 0:
        return float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
    device = next(model.parameters()).device
    model.train()
    losses = []
    while len(losses) < steps:
        epoch_start = len(losses)
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            if len(losses) == steps:
                break
        if len(losses) == epoch_start:
            raise ValueError("fine_tune: the loader yielded no batches")
    model.eval()
    mean = torch.stack(losses).mean().item()
    if not math.isfinite(mean):
        raise TrainingDivergedError(f"fine_tune: the loss became {mean} (lr={lr}, optimizer={optimizer}); "
                                    "lower the learning rate")
    return mean
