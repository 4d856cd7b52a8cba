"""The exact plan of implicit sparsity: the channels a trained network left dead or constant.

``implicit_plan(model, loader, by=...)`` combines the two exact criteria of ``criteria.py``:
"activation" (:class:`~sparsekern.prune.criteria.DeadByActivation` over an analysis of the
training corpus), "gamma" (:class:`~sparsekern.prune.criteria.ConstantGamma`, no data needed) or
"both", their union, where a channel dead by activation is taken as 0.
"""
from __future__ import annotations

from torch import nn

from sparsekern.prune.plan import LayerPlan, PrunePlan
from sparsekern.stats.analyze import analyze

PLAN_KINDS = ("activation", "gamma", "both")


def implicit_plan(model: nn.Module, loader=None, *, by: str = "activation", activation_threshold: float = 1e-12,
                  gamma_threshold: float = 1e-3, input_shape=None, progress: bool = False) -> PrunePlan:
    """The exact plan that removes what implicit sparsity left dead.

    by "activation": channels whose post-ReLU output stays below ``activation_threshold`` over
    every batch of ``loader`` (the training corpus); "gamma": |gamma| < ``gamma_threshold`` (no
    data needed); "both": the union, where a channel dead by activation is taken as 0.
    """
    if by not in PLAN_KINDS:
        raise ValueError(f"by must be one of {PLAN_KINDS}, got {by!r}")
    gamma_plan = activation_plan = None
    if by in ("gamma", "both"):
        gamma_plan = PrunePlan.from_gamma(model, gamma_threshold, input_shape=input_shape)
    if by in ("activation", "both"):
        if loader is None:
            raise ValueError(f"implicit_plan(by={by!r}) needs a loader over the training corpus")
        result = analyze(model, loader, selectivity="none", progress=progress,
                         activation_thresholds=(activation_threshold,))
        activation_plan = PrunePlan.from_analysis(result, activation_threshold, input_shape=input_shape)
    if gamma_plan is None or activation_plan is None:
        return gamma_plan or activation_plan
    return union(activation_plan, gamma_plan)


def union(dead: PrunePlan, constant: PrunePlan) -> PrunePlan:
    """Channels removed by either exact plan; ``dead``'s channels output 0, the others keep
    ``constant``'s value."""
    layers = {}
    for name in list(dead.layers) + [n for n in constant.layers if n not in dead.layers]:
        a, b = dead.layers.get(name), constant.layers.get(name)
        first = a or b
        removed_dead = set(a.removed) if a else set()
        removed = removed_dead | (set(b.removed) if b else set())
        constants = {c: v for c, v in (b.constants if b else {}).items() if c not in removed_dead}
        layers[name] = LayerPlan(channels=first.channels, kept=[c for c in range(first.channels) if c not in removed],
                                 constants=constants)
    return PrunePlan(layers=layers, exact=True, model_class=constant.model_class, input_shape=constant.input_shape,
                     source=f"{dead.source} + {constant.source}", notes=dead.notes + constant.notes)
