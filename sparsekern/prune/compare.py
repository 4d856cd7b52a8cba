"""How a pruned model compares with its original beyond the surgery's own check: logits and
accuracy over a whole dataset (held-out images the plan was not measured on), and the share of
filters a plan kept."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sparsekern.data import make_loader


@torch.no_grad()
def compare_logits(original: nn.Module, pruned: nn.Module, dataset, *, batch_size: int = 500,
                   device: Optional[torch.device] = None) -> dict:
    """How closely ``pruned`` reproduces ``original`` over ``dataset`` (both in eval mode):
    prediction agreement, max |logit difference|, the logit scale max |logit| and their ratio,
    and both accuracies."""
    device = device or next(original.parameters()).device
    modes = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    agree = correct_a = correct_b = count = 0
    max_diff = scale = 0.0
    for x, y in make_loader(dataset, batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        a, b = original(x), pruned(x)
        max_diff = max(max_diff, float((a.double() - b.double()).abs().max()))
        scale = max(scale, float(a.abs().max()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        correct_a += int((a.argmax(1) == y).sum())
        correct_b += int((b.argmax(1) == y).sum())
        count += y.shape[0]
    original.train(modes[0])
    pruned.train(modes[1])
    if count == 0:
        raise ValueError("compare_logits: the dataset is empty")
    return {"samples": count, "agreement": agree / count, "max_abs_logit_diff": max_diff, "logit_scale": scale,
            "max_rel_logit_diff": max_diff / max(1.0, scale),
            "accuracy_original": correct_a / count, "accuracy_pruned": correct_b / count}


def unit_keep_ratio(report, layers) -> float:
    """Fraction of the filters of ``layers`` a PruneReport kept."""
    before = sum(report.layers[n].channels_before for n in layers)
    after = sum(report.layers[n].channels_after for n in layers)
    return after / before
