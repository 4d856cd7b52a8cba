"""Harvest filter-level sparsity: remove dead (and constant) channels exactly.

    from sparsekern.prune import PrunePlan, prune_model
    plan = PrunePlan.from_gamma(model)                  # |gamma| < 1e-3: constant relu(beta)
    pruned, report = prune_model(model, plan, batch)    # verified against the original on `batch`
    print(report.summary())
    plan.save("plan.json"); PrunePlan.load("plan.json").apply(fresh_model, batch)

- ``criteria.py``: which filters to drop, one protocol (scores per channel, exact or a ranking):
  dead by activation, constant by |gamma|, L1-norm, Slimming, CGES, Split LBI order, APoZ,
  selectivity;
- ``plan.py``: PrunePlan (``from_criterion``, and from dead masks, gamma, an analysis, or
  scores) and its JSON manifest;
- ``graph.py``: channel dependency analysis with torch.fx (BN, activations, residual adds,
  concatenations, depthwise convs, flatten -> Linear); ``kinds.py``: what each op does to channels;
- ``surgery.py``: exact surgery and its PruneReport, by ``removal.py`` (which channels go, what
  folds), ``edits.py`` (the module edits) and ``verify.py`` (node-by-node verification);
- ``registry.py``: ``register_channel_op`` / ``ChannelHandler``: what your own modules and ops do
  to channels (identity, elementwise, channelwise, producer, opaque);
- ``fold.py``: BatchNorm folding for inference; ``flops.py``: params and MACs / FLOPs;
- ``implicit.py``: the exact plan of implicit sparsity; ``compare.py``: a pruned model's logits
  against its original over a dataset; ``baselines.py``: L1-norm and Network Slimming plans.

Timing dense versus pruned is ``sparsekern.bench``, run directories and the baselines' table are
``sparsekern.experiments.harvest`` (``harvest.py`` here is a deprecated shim).
"""
from sparsekern._deprecated import deprecated_paths
from sparsekern.prune.criteria import (
    CGES, APoZ, ConstantGamma, Criterion, DeadByActivation, ExactCriterion, L1Norm, Selectivity, Slimming,
    SplitLBIOrder, bn_gamma_scores, filter_l1_scores,
)
from sparsekern.prune.flops import count_flops, count_macs, count_params, macs_by_layer
from sparsekern.prune.fold import fold_bn, foldable_pairs
from sparsekern.errors import UntraceableModelError
from sparsekern.prune.graph import ChannelGraph, UnsupportedModelError, analyze_dependencies
from sparsekern.prune.plan import LayerPlan, ManifestError, PrunePlan
from sparsekern.prune.registry import ChannelHandler, register_channel_op, unregister_channel_op
from sparsekern.prune.surgery import LayerSurgery, PruneReport, PruneVerificationError, prune_model

__all__ = [
    "PrunePlan",
    "LayerPlan",
    "ManifestError",
    "prune_model",
    "PruneReport",
    "LayerSurgery",
    "PruneVerificationError",
    "UnsupportedModelError",
    "UntraceableModelError",
    "register_channel_op",
    "unregister_channel_op",
    "ChannelHandler",
    "ChannelGraph",
    "analyze_dependencies",
    "fold_bn",
    "foldable_pairs",
    "count_params",
    "count_macs",
    "count_flops",
    "macs_by_layer",
    "filter_l1_scores",
    "bn_gamma_scores",
    "Criterion",
    "ExactCriterion",
    "DeadByActivation",
    "ConstantGamma",
    "L1Norm",
    "Slimming",
    "CGES",
    "SplitLBIOrder",
    "APoZ",
    "Selectivity",
]

__getattr__ = deprecated_paths(__name__, {
    "LayerReport": "sparsekern.prune.surgery.LayerSurgery",
    "layer_profile": "sparsekern.bench.layers.layer_profile",
    "profile_markdown": "sparsekern.report.speed.profile_markdown",
})
