"""How the weights of a layer are split into groups, as 2-D "rows = groups" views.

Group kinds (SCIENCE.md section 3 for "input"):

  "input"            one input unit's outgoing weights. Linear (out, in): column j.
                     Conv (out, in, *kernel): one input channel at one kernel position across
                     all output filters, i.e. a column of the weight seen as (out, in*prod(kernel)).
                     Row index = the flat (in, *kernel) index, the same order as torch's flatten.
  "output"/"filter"  one output unit: a row of a Linear weight, or one conv filter (all its
                     in*prod(kernel) weights). The two names are aliases.

`group_rows` returns every group of a layer at once as a 2-D tensor, so one vectorised op
treats all groups; it is a view of the weight whenever the weight's memory layout allows it
(always for contiguous weights), and `write_rows_back` copies an edited copy back otherwise
(channels_last conv weights), so in-place updates are never silently lost.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

GROUP_KINDS = ("input", "output", "filter")
# The module types whose weights are regularised: their weight is (out, in, *kernel) or (out, in).
SPARSE_MODULE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_kind(kind: str) -> str:
    if kind not in GROUP_KINDS:
        raise ValueError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")
    return "output" if kind == "filter" else kind


def check_weight(weight: torch.Tensor, what: str = "weight") -> None:
    """Raise a clear error unless `weight` is a floating Linear (2-D) or conv (>= 3-D) weight."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"{what} must be a Linear (out, in) or conv (out, in, *kernel) weight; "
            f"got shape {tuple(weight.shape)} (biases and BatchNorm parameters have no groups)"
        )
    if not weight.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {weight.dtype}")


def group_rows(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """All groups of `weight` as a 2-D (num_groups, group_size) tensor, rows = groups.

    A view of `weight` when its layout allows (check with `shares_storage`); otherwise a copy,
    which `write_rows_back` puts back after an in-place edit.
    """
    check_weight(weight)
    kind = _check_kind(kind)
    filters = weight.reshape(weight.shape[0], -1)  # (out, in*prod(kernel)), a view if possible
    return filters.t() if kind == "input" else filters


def shares_storage(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `rows` is a view of `weight` (writes to it reach the weight)."""
    return rows.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()


def write_rows_back(weight: torch.Tensor, rows: torch.Tensor, kind: str) -> None:
    """After editing `rows = group_rows(weight, kind)` in place, make `weight` hold the result.

    A no-op when `rows` is a view of `weight`; a copy into `weight` otherwise.
    """
    if shares_storage(rows, weight):
        return
    filters = rows.t() if _check_kind(kind) == "input" else rows
    with torch.no_grad():
        weight.copy_(filters.reshape(weight.shape))


def sparse_weights(
    model_or_params: nn.Module | Iterable[torch.Tensor], layers: Iterable[str] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """The (name, weight) pairs a regulariser acts on.

    For an `nn.Module`: the weight of every Linear / Conv1d / Conv2d / Conv3d submodule, named
    like `named_parameters` does ("features.0.weight"); never biases or BatchNorm parameters.
    `layers` restricts this to the listed module names ("features.0") or parameter names
    ("features.0.weight"); a name that matches nothing is an error.
    For an iterable of tensors (e.g. `model.parameters()`): the tensors with 2 or more dims,
    named "param<i>" by their position; 0/1-D tensors (biases, BatchNorm) are skipped.
    Grouped convolutions (groups > 1) are refused: their "input" groups would mix input
    channels of different groups.
    """
    if isinstance(model_or_params, nn.Module):
        found = [(n, m.weight) for n, m in _sparse_modules(model_or_params)]
        grouped = {n for n, m in _sparse_modules(model_or_params)
                   if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1}
    else:
        if layers is not None:
            raise ValueError("`layers` selects modules by name and needs an nn.Module, not a parameter list")
        found, grouped = [], set()
        for i, p in enumerate(model_or_params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {i} is a {type(p).__name__}, not a tensor")
            if p.dim() >= 2:
                check_weight(p, f"param{i}")
                found.append((f"param{i}", p))
    if layers is not None:
        wanted = set(layers)
        selected = [(n, p) for n, p in found if n in wanted or _module_name(n) in wanted]
        matched = {n for n, _ in selected} | {_module_name(n) for n, _ in selected}
        missing = sorted(wanted - matched)
        if missing:
            raise ValueError(
                f"layers {missing} name no Linear/Conv module of the model; "
                f"available: {[_module_name(n) for n, _ in found]}"
            )
        found = selected
    for name, _ in found:
        if name in grouped:
            raise ValueError(
                f"{_module_name(name)!r} is a grouped convolution; group / exclusive sparsity is "
                "only defined here for groups=1 (pass `layers=` to leave it out)"
            )
    if not found:
        raise ValueError("no Linear / Conv weight to regularise was found")
    return found


def _module_name(param_name: str) -> str:
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def _sparse_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(weight name, module) for every Linear / Conv submodule."""
    for name, module in model.named_modules():
        if isinstance(module, SPARSE_MODULE_TYPES):
            yield (f"{name}.weight" if name else "weight"), module
