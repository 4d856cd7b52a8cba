"""Fold eval-mode BatchNorm into the Conv / Linear before it (the standard inference step).

For a BN (any torch BatchNorm, SyncBatchNorm included: ``_types.BATCH_NORMS``) right after a
layer y = W x + b (and nothing else reading that layer's output):

    BN(y) = s * (y - mean) + beta,   s = gamma / sqrt(running_var + eps)
          = (s * W) x + s * (b - mean) + beta

so the layer gets weight s[o] * W[o] and bias s * (b - mean) + beta (a bias is created when
it had none) and the BN becomes ``nn.Identity``. Computed in float64 and rounded once to the
weights' dtype, so the folded model matches the eval-mode original to fp32 rounding. The
weight keeps its memory format (channels_last stays channels_last).

A norm-then-activation module (timm's ``BatchNormAct2d``, ``_types.norm_act_activation``) is
folded the same way and replaced by its activation (its ``drop`` is an identity in eval mode).

Not folded (left as they are): BNs without running statistics (they normalise with batch
statistics even in eval), BNs whose input is not a Conv/Linear output read by that BN alone
(pre-activation BNs in DenseNet, a BN after a residual add), and modules called more than once.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sparsekern._types import BATCH_NORMS, PRODUCERS, norm_act_activation
from sparsekern.prune.graph import trace


def foldable_pairs(model: nn.Module, *, leaf_modules=(), concrete_args=None) -> list:
    """``[(layer name, bn name)]`` of the Conv/Linear -> BN pairs ``fold_bn`` folds
    (``leaf_modules`` / ``concrete_args``: how to trace, as in ``prune_model``)."""
    gm = trace(model, leaf_modules, concrete_args)
    modules = dict(model.named_modules())
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BATCH_NORMS):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node) and src.op == "call_module"
            and isinstance(modules[src.target], PRODUCERS)
            and len(src.users) == 1
            and calls[src.target] == 1 and calls[node.target] == 1
            and bn.track_running_stats and bn.running_mean is not None
        ):
            pairs.append((src.target, node.target))
    return pairs


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    w = layer.weight.detach()
    scale = bn.running_var.detach().double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    bias = shift if layer.bias is None else layer.bias.detach().double() * scale + shift
    new_w = (w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
        new_w = new_w.contiguous(memory_format=torch.channels_last)
    layer.weight = nn.Parameter(new_w, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(w.dtype), requires_grad=layer.weight.requires_grad)


def fold_bn(model: nn.Module, *, leaf_modules=(), concrete_args=None) -> nn.Module:
    """A copy of ``model`` with every foldable BN folded into the layer before it and replaced
    by ``nn.Identity`` (see the module docstring). Equal to ``model.eval()`` up to fp32 rounding;
    the copy keeps the original's train/eval flags. Raises UnsupportedModelError if the model
    cannot be traced by torch.fx."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn: expected an nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model)
    for layer_name, bn_name in foldable_pairs(folded, leaf_modules=leaf_modules, concrete_args=concrete_args):
        bn = folded.get_submodule(bn_name)
        _fold_into(folded.get_submodule(layer_name), bn)
        act = norm_act_activation(bn)
        parent, _, attr = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, attr, nn.Identity() if act is None else act)
    return folded
