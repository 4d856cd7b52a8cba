"""Surgery's edits: the new weights, biases, BN entries and sizes of the modules a removal
touches (``compute_edits``), and writing them into a model (``apply_edits``).

A producer loses its removed output channels and its removed input channels, and takes the
folded constants of the removed inputs into its bias; a grouped conv loses whole groups and the
same number of input channels in each group it keeps (their constants folded into the bias of
that group's outputs); a BN (or norm-act module) loses the entries of removed channels; a
registered module is edited by its handler (``registry.ChannelHandler.prune``).
Channels-last weights stay channels-last.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsekern._types import LINEARS
from sparsekern.prune.graph import ChannelGraph
from sparsekern.prune.kinds import CHANNELWISE, GROUPED, PERCHANNEL, PRODUCER
from sparsekern.prune.removal import Removal


def _index(t: torch.Tensor, dim: int, keep: list) -> torch.Tensor:
    out = t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def compute_edits(graph: ChannelGraph, removal: Removal) -> dict:
    """module name -> {attribute: new value}: new weights/buffers and sizes after surgery."""
    removed, edits = removal.removed, {}
    for info in graph.infos:
        if info.kind == PRODUCER and "handler" in info.detail:
            edit = _handler_edit(graph, info, removed, removal.folds.get(info.module_name, []))
        elif info.kind == PRODUCER:
            edit = _layer_edit(graph, info, removed, removal.folds.get(info.module_name, []))
        elif info.kind == GROUPED:
            edit = _grouped_edit(graph, info, removed, removal.folds.get(info.module_name, []))
        elif info.kind == PERCHANNEL and info.channels is not None:
            edit = _handler_edit(graph, info, removed, [])
        elif info.kind == CHANNELWISE and info.channels is not None:
            edit = _bn_edit(info, removed)
        else:
            continue
        if edit:
            edits[info.module_name] = edit
    return edits


def _layer_edit(graph, info, removed: set, folds: list) -> dict:
    module = info.detail["module"]
    kept_out = [c for c, a in enumerate(info.channels) if a not in removed]
    source = graph.info[info.inputs[0]].channels if info.inputs else None
    kept_in = [p for p, a in enumerate(source) if a not in removed] if source is not None else None
    in_size = module.in_features if isinstance(module, LINEARS) else module.in_channels
    if len(kept_out) == len(info.channels) and (kept_in is None or len(kept_in) == in_size) and not folds:
        return {}
    weight = module.weight.detach()
    edit = {}
    bias = None if module.bias is None else module.bias.detach().double()
    if folds:
        # bias[o] += sum_c k_c * sum_kernel W[o, c, ...]: the removed constant's contribution.
        positions = torch.tensor([p for p, _ in folds], dtype=torch.long, device=weight.device)
        constants = torch.tensor([v for _, v in folds], dtype=torch.float64, device=weight.device)
        read = weight.index_select(1, positions).double()
        read = read.flatten(2).sum(2) if read.dim() > 2 else read
        bias = (torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if bias is None else bias)
        bias = bias + read @ constants
    new_weight = _index(weight, 0, kept_out)
    if kept_in is not None:
        new_weight = _index(new_weight, 1, kept_in)
    edit["weight"] = new_weight
    if bias is not None:
        edit["bias"] = bias.index_select(0, torch.tensor(kept_out, device=bias.device)).to(weight.dtype)
    if isinstance(module, LINEARS):
        edit["out_features"], edit["in_features"] = len(kept_out), new_weight.shape[1]
    else:
        edit["out_channels"], edit["in_channels"] = len(kept_out), new_weight.shape[1]
    return edit


def _handler_edit(graph, info, removed: set, folds: list) -> dict:
    """A registered module: its handler folds constants and edits it (see ``registry.py``)."""
    kept_out = [c for c, a in enumerate(info.channels) if a not in removed]
    source = graph.info[info.inputs[0]].channels if info.inputs else []
    kept_in = [p for p, a in enumerate(source) if a not in removed]
    if len(kept_out) == len(info.channels) and len(kept_in) == len(source) and not folds:
        return {}
    return {"__handler__": (info.detail["handler"], kept_in, kept_out, list(folds))}


def _grouped_edit(graph, info, removed: set, folds: list) -> dict:
    module = info.detail["module"]
    groups = module.groups
    per_in, per_out = module.in_channels // groups, module.out_channels // groups
    kept_groups = [g for g in range(groups) if info.channels[g * per_out] not in removed]
    source = graph.info[info.inputs[0]].channels
    kept_in = {g: [i for i in range(per_in) if source[g * per_in + i] not in removed] for g in kept_groups}
    if len(kept_groups) == groups and all(len(k) == per_in for k in kept_in.values()) and not folds:
        return {}
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach().double().clone()
    if folds:  # bias[o] += k * sum of the kernel of o over the removed input it reads
        bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if bias is None else bias
        for p, v in folds:
            g, i = divmod(p, per_in)
            rows = slice(g * per_out, (g + 1) * per_out)
            bias[rows] += v * weight[rows, i].double().flatten(1).sum(1)
    kept_out = [g * per_out + j for g in kept_groups for j in range(per_out)]
    new_weight = _index(weight, 0, kept_out)
    per_kept = len(kept_in[kept_groups[0]]) if kept_groups else per_in
    if per_kept != per_in:  # the same input channels per group go (_group_count_conflicts); index each group's
        rows = [new_weight[k * per_out:(k + 1) * per_out].index_select(
            1, torch.tensor(kept_in[g], dtype=torch.long, device=weight.device)) for k, g in enumerate(kept_groups)]
        new_weight = torch.cat(rows, 0)
        if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
            new_weight = new_weight.contiguous(memory_format=torch.channels_last)
    edit = {
        "weight": new_weight,
        "groups": len(kept_groups),
        "in_channels": len(kept_groups) * per_kept,
        "out_channels": len(kept_out),
    }
    if bias is not None:
        edit["bias"] = bias.index_select(0, torch.tensor(kept_out, device=bias.device)).to(weight.dtype)
    return edit


def _bn_edit(info, removed: set) -> dict:
    module = info.detail["module"]
    kept = [p for p, a in enumerate(info.channels) if a not in removed]
    if len(kept) == len(info.channels):
        return {}
    edit = {"num_features": len(kept)}
    for attr in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(module, attr)
        if value is not None:
            edit[attr] = _index(value.detach(), 0, kept)
    return edit


def apply_edits(model: nn.Module, edits: dict) -> None:
    """Write ``edits`` (from :func:`compute_edits`) into ``model``'s modules."""
    for name, changes in edits.items():
        module = model.get_submodule(name)
        if "__handler__" in changes:
            handler, kept_in, kept_out, folds = changes["__handler__"]
            for position, value in folds:
                handler.fold(module, position, value)
            handler.prune(module, list(kept_in), list(kept_out))
            continue
        for attr, value in changes.items():
            if isinstance(value, torch.Tensor) and attr in module._parameters:
                old = module._parameters[attr]
                requires_grad = old.requires_grad if old is not None else module.weight.requires_grad
                setattr(module, attr, nn.Parameter(value.clone(), requires_grad=requires_grad))
            elif isinstance(value, torch.Tensor):
                setattr(module, attr, value.clone())
            else:
                setattr(module, attr, value)

