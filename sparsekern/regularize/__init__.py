"""Regularisers behind one interface (base.py), proximal steps and the Split LBI optimizer.

    from sparsekern.regularize import make_regularizer, SplitLBI
    reg = make_regularizer("cges", model, 1e-3)      # none | cges | lasso | group-lasso | ridge
    ...; optimizer.step(); reg.step(optimizer)       # prox step with the optimizer's current lr
    reg.sparsity()                                   # per layer zero weights / groups / filters

    opt = SplitLBI(model.parameters(), lr=0.1, kappa=1.0, nu=100.0)
    ...; opt.step(); opt.record_epoch(epoch)
    with opt.use_gamma(): evaluate(model)            # the network pruned by Gamma's support
    apply_masks(model, {"c5.weight": slbi_masks(opt, model.c5.weight, 0.125)})

base.py (the interface the training loop drives: ``weight_decay``, ``step(lr)``, state),
decay.py (L2 and decoupled weight decay), slimming.py (Network Slimming's L1 on BN gammas),
groups.py (how weights are grouped), proximal.py (the prox operators), penalties.py and
cges.py (the proximal regularisers), slbi.py (Split LBI), masks.py (pruning by score for
keep-ratio tables).
"""
from __future__ import annotations

from sparsekern.regularize.base import Regularizer
from sparsekern.regularize.cges import CGES, mu_ramp
from sparsekern.regularize.decay import DecoupledWeightDecay, L2Regularizer
from sparsekern.regularize.groups import group_rows, sparse_weights, write_rows_back
from sparsekern.regularize.masks import (
    TABLE_KEEP_RATIOS,
    apply_masks,
    keep_count,
    magnitude_masks,
    random_masks,
    slbi_masks,
)
from sparsekern.regularize.penalties import GroupLasso, Lasso, NoRegularizer, ProximalRegularizer, Ridge
from sparsekern.regularize.proximal import (
    cges_prox,
    exclusive_lasso_prox,
    group_lasso_prox,
    ridge_prox,
    soft_threshold,
)
from sparsekern.regularize.slbi import SplitLBI
from sparsekern.regularize.slimming import SlimmingPenalty, SlimmingRegularizer

# The proximal regularisers by their ``--reg`` name; the training loop adds l2, wd and slimming.
REGULARIZERS = {
    "none": NoRegularizer,
    "cges": CGES,
    "lasso": Lasso,
    "group-lasso": GroupLasso,
    "ridge": Ridge,
}


def make_regularizer(kind: str, model, strength: float = 0.0, **options) -> ProximalRegularizer:
    """The regulariser for `--reg kind`: none | cges | lasso | group-lasso | ridge.

    `model`: an nn.Module or an iterable of parameters; `strength`: lambda. `options` go to the
    class: `layers`, `optimizer`, `group_kind` (group-lasso, cges), `mu_schedule` (cges).
    Every kind has `.step(lr_or_optimizer)`, `.penalty()` and `.sparsity()`.
    """
    if kind not in REGULARIZERS:
        raise ValueError(f"unknown regulariser {kind!r}; expected one of {sorted(REGULARIZERS)}")
    return REGULARIZERS[kind](model, strength, **options)


__all__ = [
    "CGES",
    "DecoupledWeightDecay",
    "GroupLasso",
    "L2Regularizer",
    "Lasso",
    "NoRegularizer",
    "ProximalRegularizer",
    "REGULARIZERS",
    "Regularizer",
    "Ridge",
    "SlimmingPenalty",
    "SlimmingRegularizer",
    "SplitLBI",
    "TABLE_KEEP_RATIOS",
    "apply_masks",
    "cges_prox",
    "exclusive_lasso_prox",
    "group_lasso_prox",
    "group_rows",
    "keep_count",
    "magnitude_masks",
    "make_regularizer",
    "mu_ramp",
    "random_masks",
    "ridge_prox",
    "slbi_masks",
    "soft_threshold",
    "sparse_weights",
    "write_rows_back",
]
