"""Model coverage: how much of a real network's planted sparsity sparsekern measures and removes.

For one model (``torchvision:<name>``, ``timm:<name>``, or any ``nn.Module`` factory), in float64:

1. every BatchNorm gets non-trivial eval statistics and affine (``randomize_norms``), so no
   channel is accidentally constant (timm zero-initialises the last BN of its blocks);
2. about 12% of each BatchNorm's channels get gamma = 0, beta = -1 (dead after a ReLU, a
   constant after any other activation) and about 6% gamma = 0, beta = +0.3 (a constant):
   ``plant``;
3. ``PrunePlan.from_gamma`` + ``prune_model`` (partial plans: what cannot be removed exactly is
   kept, with its reason), then the pruned model is compared with the original on *fresh*
   random inputs (not the example batch the analysis saw);
4. the tracker's feature discovery and one ``analyze`` pass run on the model.

``coverage_row`` returns one row of plain data (planted, removed, MACs, kept-with-reason, the
largest relative output difference, features found, errors); ``benchmarks/coverage_zoo.py``
runs it over model families and writes the README's coverage table; ``python_tests/test_zoo.py``
asserts on it. The row's ``max_rel_diff`` is measured here against the original model's own
outputs: the reference is the model, not anything sparsekern computes.
"""
from __future__ import annotations

import math
import re
import time
import traceback
from collections import Counter

import torch
from torch import nn

from sparsekern._types import BATCH_NORMS, norm_act_activation
from sparsekern.models.external import build_external
from sparsekern.prune import PrunePlan, prune_model
from sparsekern.stats.analyze import analyze
from sparsekern.stats.features import find_features

DEAD_FRACTION = 0.12
CONSTANT_FRACTION = 0.06
DEAD_BETA = -1.0
CONSTANT_BETA = 0.3
# Norm layers a row counts (BatchNorm of any kind, GroupNorm, LayerNorm). Channels are planted in
# BatchNorms only (gamma = 0 makes a channel constant only there), so the coverage figures are
# over the models with a BatchNorm.
NORMS = BATCH_NORMS + (nn.GroupNorm, nn.LayerNorm)

# The zoo: the smallest variant of every torchvision classification CNN family (the vision
# transformers vit / swin are not CNNs and are left out; maxvit, a conv-attention hybrid, is in),
# and one small model of every timm module that builds CNNs, chosen to cover the families
# (ReLU, SiLU / Hardswish, norm-act modules, squeeze-excitation, split and shuffle, grouped
# convs, multi-branch with upsampling, norm-free, reparameterisable), not by how well they prune.
# (spec, input size): 64 px unless a model needs more (inception: 75+ px).
TORCHVISION = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    ("inception_v3", 96), ("maxvit_t", 224), "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small",
    "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5",
    "squeezenet1_1", "vgg11", "vgg11_bn", "wide_resnet50_2",
]
TIMM = [
    "resnet10t", "resnet26d", "seresnext26d_32x4d", "resnetv2_50", "efficientnet_b0", "efficientnet_lite0",
    "tinynet_e", "mixnet_s", "mobilenetv3_small_100", "mobilenetv4_conv_small", "lcnet_050",
    "fbnetc_100", "spnasnet_100", "hardcorenas_a", "cspresnet50", "cspdarknet53", "darknet17",
    "dpn48b", "ese_vovnet19b_slim", "repvgg_a0", "gernet_s", "mobileone_s0", "densenet121",
    "regnetx_002", "regnety_002", "res2net50_14w_8s", "resnest14d", "skresnet18", "ghostnet_100",
    "repghostnet_050", "hrnet_w18_small", "nf_resnet26", "rexnet_100", "dla34", "selecsls42b",
    "legacy_seresnet18", "tresnet_m", ("inception_v3", 96), "xception41", "vgg11_bn", "hgnetv2_b0",
    "convnext_atto", "repvit_m0_9", "starnet_s050", "fasternet_t0",
]
ZOO = [(f"torchvision:{m}", 64) if isinstance(m, str) else (f"torchvision:{m[0]}", m[1]) for m in TORCHVISION] + \
         [(f"timm:{m}", 64) if isinstance(m, str) else (f"timm:{m[0]}", m[1]) for m in TIMM]


def build_model(spec) -> nn.Module:
    """A randomly initialised model: a ``--model`` spec (``torchvision:<name>``, ``timm:<name>``,
    ``package.module:factory``; ``sparsekern.models.external``) or a callable returning one."""
    return spec() if callable(spec) else build_external(spec)


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Eval-mode BN statistics and affine drawn so every channel varies and activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, BATCH_NORMS) and m.running_mean is not None:
            c = m.num_features
            if m.weight is not None:
                m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 0.5 + 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)


@torch.no_grad()
def plant(model: nn.Module, seed: int = 0, dead_fraction: float = DEAD_FRACTION,
          constant_fraction: float = CONSTANT_FRACTION) -> dict:
    """Plant gamma = 0 channels in every affine BatchNorm; {bn name: (dead, constant) channel lists}."""
    g = torch.Generator().manual_seed(seed + 1)
    planted = {}
    for name, m in model.named_modules():
        if not isinstance(m, BATCH_NORMS) or m.weight is None or m.bias is None:
            continue
        c = m.num_features
        order = torch.randperm(c, generator=g).tolist()
        n_dead, n_const = round(dead_fraction * c), round(constant_fraction * c)
        dead, const = sorted(order[:n_dead]), sorted(order[n_dead:n_dead + n_const])
        m.weight[dead + const] = 0.0
        m.bias[dead] = DEAD_BETA
        m.bias[const] = CONSTANT_BETA
        planted[name] = (dead, const)
    return planted


def _outputs(model: nn.Module, x: torch.Tensor) -> list:
    """The model's tensor outputs, flattened (some models return tuples or dicts)."""
    with torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for t in out if isinstance(t, torch.Tensor)]


def max_rel_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """max |a(x) - b(x)| / max(1, max |a(x)|) over every tensor output."""
    worst = 0.0
    outs_a, outs_b = _outputs(a, x), _outputs(b, x)
    if len(outs_a) != len(outs_b):
        return math.inf
    for ta, tb in zip(outs_a, outs_b):
        if ta.shape != tb.shape:
            return math.inf
        scale = max(1.0, float(ta.abs().max()))
        worst = max(worst, float((ta - tb).abs().max()) / scale)
    return worst


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(before: dict, model: nn.Module) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(
        before[k].shape == after[k].shape and torch.equal(before[k], after[k]) for k in before
    )


def _reason_class(why: str) -> str:
    """A kept channel's reason without its layer and channel names and numbers, so reasons count."""
    why = re.sub(r"'[^']*'", "'…'", why)
    why = re.sub(r"\b[\w.]+\[\d+\](, [\w.]+\[\d+\])*", "…", why)
    why = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", why)
    return why[:120]


def coverage_row(spec, input_size: int = 64, *, batch: int = 2, seed: int = 0, measure: bool = True) -> dict:
    """Plant, prune and check one model (see the module docstring); never raises."""
    row = {"model": spec if isinstance(spec, str) else getattr(spec, "__name__", str(spec)),
           "input_size": input_size, "error": None}
    start = time.perf_counter()
    try:
        model = build_model(spec).double().eval()
        row["params"] = sum(p.numel() for p in model.parameters())
        row["norm_layers"] = sum(isinstance(m, NORMS) for m in model.modules())
        row["batch_norms"] = sum(isinstance(m, BATCH_NORMS) for m in model.modules())
        row["norm_act_layers"] = sum(norm_act_activation(m) is not None for m in model.modules())
        randomize_norms(model, seed)
        planted = plant(model, seed)
        row["planted"] = sum(len(d) + len(c) for d, c in planted.values())
        g = torch.Generator().manual_seed(seed + 2)
        example = torch.randn(batch, 3, input_size, input_size, generator=g, dtype=torch.float64)
        fresh = torch.randn(batch, 3, input_size, input_size, generator=g, dtype=torch.float64)
        before = _state(model)

        plan = PrunePlan.from_gamma(model)
        row["planned"] = plan.num_removed
        pruned, report = prune_model(model, plan, example)
        row["caller_unchanged"] = _same_state(before, model)
        row["removed"] = sum(r.removed_dead + r.removed_constant for r in report.layers.values())
        row["macs_before"], row["macs_after"] = report.macs_before, report.macs_after
        kept = Counter()
        for r in report.layers.values():
            for why in r.kept.values():
                kept[_reason_class(why)] += 1
        row["kept"] = dict(kept.most_common())
        row["notes"] = list(report.notes)[:5]
        row["max_rel_diff"] = max_rel_diff(model, pruned, fresh)
    except Exception as exc:  # a row per model, whatever happens: the table shows the failure
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        row["traceback"] = traceback.format_exc(limit=-3)
    if measure:
        row.update(_measure(spec, input_size, seed))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _measure(spec, input_size: int, seed: int) -> dict:
    """Features the tracker finds, and whether one ``analyze`` pass runs (float32)."""
    out = {"features": 0, "activations": {}, "analyze_error": None}
    try:
        model = build_model(spec).eval()
        randomize_norms(model, seed)
        features = find_features(model)
        out["features"] = len(features)
        out["activations"] = dict(Counter(getattr(f, "activation", "relu") for f in features))
        g = torch.Generator().manual_seed(seed + 3)
        batches = [(torch.randn(2, 3, input_size, input_size, generator=g), torch.zeros(2, dtype=torch.long))]
        result = analyze(model, batches, selectivity="none", progress=False, features=features)
        out["analyzed_features"] = len(result.features)
    except Exception as exc:
        out["analyze_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return out


def exact(row: dict, tolerance: float = 1e-9) -> bool:
    """The pruned model matched the original on fresh inputs and the caller's model is unchanged."""
    return row.get("error") is None and row.get("caller_unchanged", False) and row.get("max_rel_diff", math.inf) <= tolerance


__all__ = ["ZOO", "build_model", "coverage_row", "exact", "max_rel_diff", "plant", "randomize_norms"]
