"""Explicit-pruning baselines to compare implicit sparsity against, at a matched keep ratio.

- **L1-norm filter pruning** (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): rank
  the filters of each layer by the L1 norm of their weights, keep the best of each layer,
  fine-tune. :func:`l1_norm_plan`.
- **Network Slimming** (Liu et al. 2017, "Learning Efficient Convolutional Networks through
  Network Slimming"): train with an L1 penalty on every BN scale gamma
  (``sparsekern.regularize.slimming``; ``--reg slimming`` of ``sparsekern train``), then
  remove the channels under one *global* threshold on |gamma| chosen to reach the keep ratio,
  then fine-tune. :func:`slimming_threshold` / :func:`slimming_plan`.

Fine-tuning the pruned models is ``sparsekern.train.finetune.fine_tune``: pruning never imports
a training loop.

Both plans cover the same layers: every Conv/Linear followed by a BN in its unit (the Conv-BN-ReLU
units whose filters implicit sparsity kills), never the classifier, whose outputs are the logits.
The plans are lossy (``exact = False``): surgery verifies that the pruned model equals the
original with the removed channels zeroed, not the original itself.
"""
from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import nn

from sparsekern._deprecated import deprecated_paths
from sparsekern.prune.criteria import L1Norm, Slimming, unit_layers
from sparsekern.prune.plan import PrunePlan, check_keep_ratio

__all__ = ["l1_norm_plan", "slimming_plan", "slimming_threshold", "unit_layers"]


# --- L1-norm filter pruning ----------------------------------------------------------------------


def l1_norm_plan(model: nn.Module, keep: Union[float, Mapping[str, int]], *, input_shape=None) -> PrunePlan:
    """Li et al.'s plan: per layer, keep the filters with the largest L1 weight norm
    (:class:`~sparsekern.prune.criteria.L1Norm` through ``PrunePlan.from_criterion``).

    keep: a ratio in (0, 1] kept in every unit layer (``round(keep * channels)``, at least 1), or
    ``{layer: number of filters kept}`` to give each layer its own count (e.g. the per-layer counts
    implicit sparsity left, so both pruned networks have the same shape). Layers missing from the
    mapping keep all their filters. Ties keep the lower channel index.
    """
    return PrunePlan.from_criterion(L1Norm(), model, keep, input_shape=input_shape)


# --- Network Slimming ----------------------------------------------------------------------------


def slimming_threshold(model: nn.Module, keep_ratio: float) -> float:
    """The global |gamma| threshold of Network Slimming: the smallest |gamma| among the
    ``round(keep_ratio * total)`` largest over all unit BNs (channels at or above it are kept)."""
    check_keep_ratio(keep_ratio)
    flat = torch.cat(list(Slimming().scores(model).values()))
    k = max(1, int(round(keep_ratio * flat.numel())))
    return float(torch.topk(flat, k).values[-1])


def slimming_plan(model: nn.Module, keep_ratio: float, *, input_shape=None) -> PrunePlan:
    """Liu et al.'s plan: keep the ``round(keep_ratio * total)`` channels with the largest |gamma|
    over all unit BNs (one global threshold, :func:`slimming_threshold`; the
    :class:`~sparsekern.prune.criteria.Slimming` criterion); every layer keeps at least its best
    channel, so a tiny ratio can keep slightly more."""
    return PrunePlan.from_criterion(Slimming(), model, keep_ratio, input_shape=input_shape)


# Moved: the slimming penalty to the regularisers, fine-tuning to training.
__getattr__ = deprecated_paths(__name__, {
    "SlimmingPenalty": "sparsekern.regularize.slimming.SlimmingPenalty",
    "SlimmingRegularizer": "sparsekern.regularize.slimming.SlimmingRegularizer",
    "fine_tune": "sparsekern.train.finetune.fine_tune",
})
