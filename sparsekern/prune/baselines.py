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
from sparsekern.prune.plan import LayerPlan, PrunePlan, bn_gamma_scores, filter_l1_scores
from sparsekern.prune.surgery import class_path


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


# Moved: the slimming penalty to the regularisers, fine-tuning to training.
__getattr__ = deprecated_paths(__name__, {
    "SlimmingPenalty": "sparsekern.regularize.slimming.SlimmingPenalty",
    "SlimmingRegularizer": "sparsekern.regularize.slimming.SlimmingRegularizer",
    "fine_tune": "sparsekern.train.finetune.fine_tune",
})
