"""Timing candidates side by side: the interleaved timer, subnormal flushing, and timing models.

Every comparison is measured in one process and one run: each candidate is timed in interleaved
rounds (A, B, C, A, B, C, ...) so that drift in the machine's load hits all of them alike, and the
median of the rounds is reported with p20 / p80. ``sparsekern bench`` and the benchmarks/ scripts
use the same timer.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from sparsekern._denormals import flush_denormal_enabled


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timer(candidates: dict[str, Callable[[], object]], *, device, rounds: int = 15,
                      min_round_s: float = 0.05, warmup: int = 2) -> dict[str, dict[str, float]]:
    """{name: {"median_s", "p20_s", "p80_s", "rounds"}}: seconds per call of each candidate, timed in
    ``rounds`` interleaved rounds. Each candidate is called often enough per round for the round to
    last about ``min_round_s`` (calls of a fast candidate are too short to time one by one), after
    ``warmup`` untimed calls each; the device is synchronised around every timed stretch."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    device = torch.device(device)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    reps = {}
    for name, fn in candidates.items():
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        reps[name] = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / reps[name])
    out = {}
    for name, s in samples.items():
        deciles = statistics.quantiles(s, n=10) if len(s) > 1 else [s[0]] * 9  # quantiles needs 2 points
        out[name] = {"median_s": statistics.median(s), "p20_s": deciles[1], "p80_s": deciles[7], "rounds": len(s)}
    return out


@contextlib.contextmanager
def flush_denormals(enabled: bool = True):
    """Within the block, the calling thread's CPU float ops flush subnormals to zero
    (``torch.set_flush_denormal``, the FTZ/DAZ flags). Only that thread: torch's worker threads keep
    the flags they were created with, which is why timing copies also zero subnormal weights
    (``sparsekern.bench.speed.inference_model``). Yields whether flushing is on (False where the CPU
    lacks SSE3). Afterwards the flag is off again, torch's default, unless
    ``SPARSEKERN_FLUSH_DENORMAL=1`` turned it on for the whole process (then it is left on)."""
    if flush_denormal_enabled():
        yield True
        return
    on = bool(enabled) and torch.set_flush_denormal(True)
    try:
        yield on
    finally:
        if on:
            torch.set_flush_denormal(False)


def time_models(models: dict[str, nn.Module], input_shape, *, device, dtype: torch.dtype = torch.float32,
                timer: Optional[Callable] = None, rounds: int = 15, flush_denormal: bool = True) -> dict[str, float]:
    """Median seconds per forward of each model on one random batch of ``input_shape``
    (channels_last, ``dtype``), side by side under inference mode, with subnormals flushed to zero
    on CPU unless ``flush_denormal=False`` (:func:`flush_denormals`). ``timer``: a function with
    :func:`interleaved_timer`'s signature and result (the default)."""
    timer = timer or interleaved_timer
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), flush_denormals(flush_denormal and torch.device(device).type == "cpu"):
        timing = timer({name: (lambda m=m: m(x)) for name, m in models.items()}, device=device, rounds=rounds)
    return {name: t["median_s"] for name, t in timing.items()}


def copy_bandwidth(nbytes: int, device) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read + bytes written (what a
    memory-bound kernel is judged against)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = interleaved_timer({"copy": lambda: dst.copy_(src)}, device=device, rounds=9)["copy"]["median_s"]
    return 2 * src.numel() * 4 / t / 1e9
