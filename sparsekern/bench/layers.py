"""Where the time goes: per-layer forward time of a dense and a pruned model, next to MACs.

``bench`` says whether time saved tracks FLOPs saved for the whole network; when it does not,
the question is which layers cost more per MAC than others (large feature maps, memory-bound
pooling and activations, channel counts that fit the SIMD width badly). ``layer_profile`` times
every leaf module of each model with forward hooks over ``rounds`` forwards, the models taking
turns (the device is synchronised around each leaf, so on GPU the numbers include the syncs: use
it to compare layers, not as the model's total), and reports each leaf's median time with its
Conv/Linear MACs.
Leaves are matched by qualified name: surgery keeps the names, so dense and pruned line up.
The table is ``sparsekern.report.speed.profile_markdown``.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from sparsekern.bench.timing import synchronize
from sparsekern.prune.flops import macs_by_layer


def _leaves(model: nn.Module) -> dict:
    """Modules without children, except Identity (what BN folding leaves in place of a BN)."""
    return {name: m for name, m in model.named_modules()
            if name and not any(True for _ in m.children()) and not isinstance(m, nn.Identity)}


class _LeafTimer:
    """Forward hooks on every leaf of a model; ``forward(x)`` returns {leaf: seconds, "(total)": ...}
    for one call (a leaf called twice in one forward gets the sum of its calls)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device, self.starts, self.current, self.handles = model, device, {}, {}, []
        for name, module in _leaves(model).items():
            self.handles += [module.register_forward_pre_hook(lambda m, args, name=name: self._start(name)),
                             module.register_forward_hook(lambda m, args, out, name=name: self._stop(name))]

    def _start(self, name):
        synchronize(self.device)
        self.starts[name] = time.perf_counter()

    def _stop(self, name):
        synchronize(self.device)
        self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - self.starts[name]

    def forward(self, x) -> dict:
        self.current = {}
        synchronize(self.device)
        begin = time.perf_counter()
        self.model(x)
        synchronize(self.device)
        self.current["(total)"] = time.perf_counter() - begin
        return self.current

    def remove(self):
        for h in self.handles:
            h.remove()


def leaf_times(models: dict, x: torch.Tensor, *, rounds: int = 10, warmup: int = 2) -> dict:
    """{label: {leaf module name: median seconds per forward, "(total)": whole forward}} for each
    of ``models`` ({label: model}) on ``x``, the models taking turns forward by forward so that
    drift in the machine's speed hits all of them alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    timers = {label: _LeafTimer(m, x.device) for label, m in models.items()}
    samples = {label: {} for label in models}
    try:
        with torch.inference_mode():
            for i in range(warmup + rounds):
                for label, timer in timers.items():
                    got = timer.forward(x)
                    if i >= warmup:
                        for name, seconds in got.items():
                            samples[label].setdefault(name, []).append(seconds)
    finally:
        for timer in timers.values():
            timer.remove()
    return {label: {name: statistics.median(s) for name, s in per.items()} for label, per in samples.items()}


def layer_profile(models: dict, input_shape, *, rounds: int = 10) -> list:
    """Rows ``{"layer", "<model> ms", "<model> MACs"...}`` for every leaf of any of ``models``
    ({name: inference-ready model}, all on one device and dtype, taking one input shape), in the
    first model's execution order, then "(other)" (the forward's time outside the leaves: the
    model's own code) and "(total)". MACs are per sample; ms is for the whole batch."""
    if not models:
        raise ValueError("layer_profile needs at least one model")
    first = next(iter(models.values()))
    param = next(first.parameters())
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    times = leaf_times(models, x, rounds=rounds)
    macs = {label: macs_by_layer(model, (x[:1],)) for label, model in models.items()}
    order = [n for n in times[next(iter(models))] if n != "(total)"]
    for label in models:
        order += [n for n in times[label] if n != "(total)" and n not in order]
    rows = []
    for name in order + ["(other)", "(total)"]:
        row = {"layer": name}
        for label in models:
            if name == "(other)":
                seconds = times[label]["(total)"] - sum(v for k, v in times[label].items() if k != "(total)")
                row[f"{label} MACs"] = 0
            elif name == "(total)":
                seconds = times[label]["(total)"]
                row[f"{label} MACs"] = sum(macs[label].values())
            else:
                seconds = times[label].get(name)
                row[f"{label} MACs"] = macs[label].get(name, 0) if seconds is not None else None
            row[f"{label} ms"] = None if seconds is None else 1e3 * seconds
        rows.append(row)
    return rows
