"""Opt-in flushing of subnormal floats on CPU: ``SPARSEKERN_FLUSH_DENORMAL=1``.

Why: L2 / weight decay shrinks the weights of dead filters towards zero until many are subnormal
(below 1.2e-38 in float32), and x86 CPUs compute with subnormals many times slower. Measured on an
Intel Xeon (2 cores, torch 2.14.1): a BasicNet w0.25 Adam + L2 training step went from 0.045 s to
0.128 s as its filters died, and the trained dense network ran 4.5x slower at inference. Flushing
(the FTZ/DAZ flags, ``torch.set_flush_denormal``) turns those values into zeros, which changes no
result this package reports (dead means max |activation| < 1e-12), but does change the bits of a
training trajectory: it is therefore opt-in, and recorded in every run's result.

The flag is per thread, and a thread inherits it when created: it must be set before torch starts
its intra-op worker threads (the first parallel op), which is why it is read once at
``import sparsekern``. Sweep / demo worker processes inherit the environment variable.
"""
from __future__ import annotations

import contextlib
import os

import torch

ENV_VAR = "SPARSEKERN_FLUSH_DENORMAL"
_enabled = False


def configure_from_environment() -> bool:
    """Turn flushing on if ``SPARSEKERN_FLUSH_DENORMAL`` is 1 / true / yes; return whether it is on.
    Any other non-empty value except 0 / false / no is an error naming the variable."""
    global _enabled
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return _enabled
    if value not in ("1", "true", "yes"):
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 1 or 0")
    _enabled = bool(torch.set_flush_denormal(True))
    return _enabled


def flush_denormal_enabled() -> bool:
    """Whether this process turned on flushing of subnormals through ``SPARSEKERN_FLUSH_DENORMAL``."""
    return _enabled


def subnormal_mask(t: torch.Tensor) -> torch.Tensor:
    """Bool mask of the subnormal elements of floating-point ``t`` (0 < |x| < smallest normal)."""
    a = t.detach().abs()
    return (a > 0) & (a < torch.finfo(t.dtype).tiny)


def subnormal_count(tensors) -> int:
    """How many elements of the floating-point ``tensors`` are subnormal."""
    return sum(int(subnormal_mask(t).sum()) for t in tensors if t.is_floating_point())


@contextlib.contextmanager
def on_for_worker_processes():
    """Within the block, worker processes started from here (sweep / demo runs) flush subnormals,
    unless the user set ``SPARSEKERN_FLUSH_DENORMAL`` themselves (to anything: 0 keeps it off).
    This process's own flags are left alone. Yields the value the workers see."""
    if ENV_VAR in os.environ:
        yield os.environ[ENV_VAR]
        return
    os.environ[ENV_VAR] = "1"
    try:
        yield "1"
    finally:
        os.environ.pop(ENV_VAR, None)
