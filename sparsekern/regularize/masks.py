"""Pruning one layer by a score, for the keep-ratio tables of the Split LBI papers (SCIENCE.md
section 4): Plain / R-P / L-P / GL-P rank by weight magnitude, Rand at random, S-P by when a
unit entered the support of Split LBI's Gamma. Pruned weights are zeroed with no fine-tuning.

Units: kind "filter" = one output unit (a conv filter, or a row of a Linear weight);
kind "weight" = single weights.

Number kept: `max(1, floor(keep_ratio * n + 0.5))` of the layer's n units, i.e. rounded half
up (not Python's round-half-to-even, so 7.5 -> 8 and 2.5 -> 3 alike) and never 0, so the
smallest ratios of the tables (3.13 %, 1.57 %) still keep one unit of a small layer.
Masks are bool tensors of the weight's shape (True = kept).

The ranking order is :func:`rank_units`, which prune plans use too (``prune.criteria`` /
``PrunePlan.from_criterion``: descending score, ties to the lower index). What stays apart, and
why: these masks zero weights in place (single weights too, not only filters) instead of
removing channels by surgery, and they keep ``floor(r * n + 0.5)`` units, the tables' rounding,
where plans keep ``round(r * n)`` (the rule the method table's results were made with); the
two counts differ only when ``r * n`` is exactly k + 0.5 with k even (round goes down to k).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern.regularize.groups import check_weight, group_rows

UNIT_KINDS = ("filter", "weight")
# The keep ratios (as fractions) of the published LeNet-5 tables.
TABLE_KEEP_RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0313, 0.0157)


def keep_count(keep_ratio: float, num_units: int) -> int:
    """How many of `num_units` units a keep ratio (a fraction in (0, 1]) keeps."""
    if not (isinstance(keep_ratio, (int, float)) and 0.0 < keep_ratio <= 1.0):
        percent = isinstance(keep_ratio, (int, float)) and 1 < keep_ratio <= 100
        hint = f" (did you mean {keep_ratio / 100}?)" if percent else ""
        raise ValueError(f"keep_ratio must be a fraction in (0, 1], got {keep_ratio!r}{hint}")
    if num_units < 1:
        raise ValueError(f"cannot prune a layer with {num_units} units")
    return max(1, min(num_units, math.floor(keep_ratio * num_units + 0.5)))


def _check_kind(kind: str) -> None:
    if kind not in UNIT_KINDS:
        raise ValueError(f"unknown unit kind {kind!r}; expected one of {UNIT_KINDS}")


def num_units(weight: torch.Tensor, kind: str) -> int:
    """Units of `kind` in the weight: output filters, or single weights."""
    _check_kind(kind)
    return weight.shape[0] if kind == "filter" else weight.numel()


def rank_units(scores: torch.Tensor) -> torch.Tensor:
    """Unit indices by descending score, ties to the lower index (a stable sort): the one
    ranking order of these masks and of prune plans."""
    return torch.sort(scores, descending=True, stable=True).indices


def mask_from_ranking(weight: torch.Tensor, ranking: torch.Tensor, keep_ratio: float, kind: str) -> torch.Tensor:
    """Weight-shaped bool mask keeping the first `keep_count` units of `ranking` (unit indices,
    most important first; flat indices for kind "weight")."""
    check_weight(weight)
    n = num_units(weight, kind)
    if ranking.shape != (n,):
        raise ValueError(f"a ranking of {n} {kind} units was expected, got shape {tuple(ranking.shape)}")
    kept = torch.zeros(n, dtype=torch.bool, device=weight.device)
    kept[ranking[: keep_count(keep_ratio, n)].to(weight.device)] = True
    if kind == "weight":
        return kept.view(weight.shape)
    return kept.view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).contiguous()


def magnitude_masks(weight: torch.Tensor, keep_ratio: float, kind: str = "filter", p: int = 1) -> torch.Tensor:
    """Keep the units with the largest L`p` norm (`p` = 1 or 2; for single weights |w|).

    Ties go to the lower index. The Plain, R-P, L-P and GL-P rows of the tables.
    """
    check_weight(weight)
    _check_kind(kind)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    with torch.no_grad():
        if kind == "filter":
            scores = torch.linalg.vector_norm(group_rows(weight, "filter"), ord=p, dim=1)
        else:
            scores = weight.abs().flatten()
        ranking = rank_units(scores)
    return mask_from_ranking(weight, ranking, keep_ratio, kind)


def random_masks(weight: torch.Tensor, keep_ratio: float, kind: str = "filter", seed: int = 0) -> torch.Tensor:
    """Keep a uniformly random set of units (the Rand row); the same `seed` gives the same mask."""
    check_weight(weight)
    generator = torch.Generator().manual_seed(seed)  # CPU generator: same mask on every device
    ranking = torch.randperm(num_units(weight, kind), generator=generator)
    return mask_from_ranking(weight, ranking, keep_ratio, kind)


def slbi_masks(optimizer, param: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Keep the units Split LBI ranks first (the S-P row): earliest into Gamma's support, then
    by ||Gamma|| and ||W||. `optimizer` is a `SplitLBI` that has been optimising `param`; its
    unit kind ("filter" or "weight") follows the optimizer's mode for that parameter."""
    return mask_from_ranking(param, optimizer.importance(param), keep_ratio, optimizer.unit_kind(param))


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, the weights of `model` where the mask is False.

    `masks` maps parameter names (as in `model.named_parameters()`) to bool masks of the
    parameter's shape, or of shape (out,) to keep / drop whole output filters.
    """
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"{name!r} is not a parameter of the model")
        weight = params[name]
        if mask.dtype != torch.bool:
            raise TypeError(f"mask for {name} must be a bool tensor, got {mask.dtype}")
        if mask.dim() == 1 and weight.dim() > 1 and mask.shape[0] == weight.shape[0]:
            mask = mask.view(-1, *([1] * (weight.dim() - 1)))
        elif mask.shape != weight.shape:
            raise ValueError(
                f"mask for {name} has shape {tuple(mask.shape)}; expected {tuple(weight.shape)} "
                f"or ({weight.shape[0]},) for whole filters"
            )
        weight.mul_(mask.to(weight.device))
