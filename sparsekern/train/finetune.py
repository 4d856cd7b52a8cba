"""Fine-tuning a pruned model: a few plain optimizer steps with cross-entropy.

The explicit-pruning baselines (L1-norm, Network Slimming) are compared after fine-tuning
(``sparsekern harvest --fine-tune-steps``); the pruning package only makes the pruned model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.errors import TrainingDivergedError

FINE_TUNE_OPTIMIZERS = ("adam", "sgd")


def fine_tune(model: nn.Module, loader, steps: int, lr: float, *, optimizer: str = "adam",
              momentum: float = 0.9, weight_decay: float = 0.0) -> float:
    """Train ``model`` in place for ``steps`` mini-batches of ``loader`` (cycled) with cross-entropy;
    return the mean training loss over those steps. The model is left in eval mode.

    optimizer: "adam" or "sgd" (with ``momentum``; the baselines' papers fine-tune with SGD).
    weight_decay: L2 coefficient, 0 by default: L2 under Adam is what kills filters in the first
    place. Batches go to the model's device. Raises TrainingDivergedError on a non-finite loss.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fine_tune: steps must be an int >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"fine_tune: lr must be a finite number > 0, got {lr!r}")
    if optimizer not in FINE_TUNE_OPTIMIZERS:
        raise ValueError(f"fine_tune: optimizer must be one of {FINE_TUNE_OPTIMIZERS}, got {optimizer!r}")
    if steps == 0:
        return float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
    device = next(model.parameters()).device
    model.train()
    losses = []
    while len(losses) < steps:
        epoch_start = len(losses)
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            if len(losses) == steps:
                break
        if len(losses) == epoch_start:
            raise ValueError("fine_tune: the loader yielded no batches")
    model.eval()
    mean = torch.stack(losses).mean().item()
    if not math.isfinite(mean):
        raise TrainingDivergedError(f"fine_tune: the loss became {mean} (lr={lr}, optimizer={optimizer}); "
                                    "lower the learning rate")
    return mean
