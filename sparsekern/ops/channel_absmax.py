"""channel_absmax: per-sample, per-channel max |x| over every position after the channel dim.

    m[n, c] = max_{p} |x[n, c, p]|        (float32 result)

With ``count_positive=True`` the same pass also counts, per (n, c), the elements > 0
(for APoZ, the average percentage of zeros of Hu et al. 2016).

``channel_extrema`` is the same pass with the signed range as well (one kernel launch, every
element read once): per (n, c) the max |x|, ``min_p x[n, c, p]`` and ``max_p x[n, c, p]``, and
optionally the positive counts. The statistics use it to find channels whose activation never
varies ("constant by activation", any activation function).

NaN: a (n, c) that saw a NaN gets NaN in the result (never a number), in the min and max too.
+-Inf gives inf (and -inf / +inf in the min / max). Over no positions the max |x| is 0, the min
+inf and the max -inf (the identities of the reductions, so partial results merge exactly).
Zeros: min and max compare -0.0 equal to +0.0, so a zero min or max may come out with either sign.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from sparsekern import _backend
from sparsekern._layout import DTYPE_CODE, as_view4, check_activation

OP = "channel_absmax"
OP_EXTREMA = "channel_extrema"


class ChannelExtrema(NamedTuple):
    """What ``channel_extrema`` returns: (N, C) float32 ``absmax``, ``minimum``, ``maximum`` and,
    with ``count_positive=True``, (N, C) int64 ``positive`` (else None)."""

    absmax: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor
    positive: Optional[torch.Tensor]


def traced(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` is being traced (torch.compile, torch.export, make_fx, a fake or
    functional tensor). Traced calls go through the registered ``torch.ops.sparsekern`` op, which
    the tracer records as one node; an eager call runs the same implementation directly, skipping
    the torch.library dispatcher (~150 us of Python per call, measured: as much as the kernel on a
    late-stage 64x192x6x6 activation).
    """
    return type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _flat(x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[0], x.shape[1]
    # Explicit trailing size: reshape(n, c, -1) is ambiguous when n or c is 0.
    return x.reshape(n, c, math.prod(x.shape[2:]))


def channel_absmax_reference(x: torch.Tensor, count_positive: bool = False):
    """Pure-torch definition; the oracle the kernels are tested against, and the last fallback."""
    n, c = x.shape[0], x.shape[1]
    flat = _flat(x)
    if flat.shape[2] == 0:
        m = torch.zeros(n, c, dtype=torch.float32, device=x.device)
    else:
        # amax propagates NaN, which is exactly the contract.
        m = flat.abs().amax(dim=2).to(torch.float32)
    if not count_positive:
        return m
    return m, (flat > 0).sum(dim=2, dtype=torch.int64)


def channel_extrema_reference(x: torch.Tensor, count_positive: bool = False) -> ChannelExtrema:
    """Pure-torch definition of ``channel_extrema`` (the last fallback)."""
    n, c = x.shape[0], x.shape[1]
    m, positive = channel_absmax_reference(x, True)
    flat = _flat(x)
    if flat.shape[2] == 0:
        lo = torch.full((n, c), float("inf"), dtype=torch.float32, device=x.device)
        hi = torch.full((n, c), float("-inf"), dtype=torch.float32, device=x.device)
    else:  # amin / amax propagate NaN
        lo, hi = flat.amin(dim=2).to(torch.float32), flat.amax(dim=2).to(torch.float32)
    return ChannelExtrema(m, lo, hi, positive if count_positive else None)


def _run(x: torch.Tensor, count_positive: bool, extrema: bool, backend: str, op: str):
    """(max, counts or None, min or None, max or None) from one kernel pass on the chosen backend."""
    check_activation(x, op)
    chosen = _backend.resolve(backend, x.device, op=op)
    n, c = x.shape[0], x.shape[1]
    if x.numel() == 0 or chosen == "torch":
        if extrema:
            r = channel_extrema_reference(x, count_positive)
            return r.absmax, r.positive, r.minimum, r.maximum
        m, counts = channel_absmax_reference(x, True)
        return m, counts if count_positive else None, None, None
    x, view = as_view4(x)
    out = torch.empty(n, c, dtype=torch.float32, device=x.device)
    counts = torch.empty(n, c, dtype=torch.int64, device=x.device) if count_positive else None
    lo = torch.empty(n, c, dtype=torch.float32, device=x.device) if extrema else None
    hi = torch.empty(n, c, dtype=torch.float32, device=x.device) if extrema else None
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731  (0: the kernel skips that output)
    with _backend.cuda_device(x):  # every kernel launches on the current device: make it x's
        if chosen == "cpp":
            _backend.extension().channel_absmax_cpu(
                x.data_ptr(), DTYPE_CODE[x.dtype], *view.args(), out.data_ptr(), ptr(counts), ptr(lo), ptr(hi)
            )
        elif chosen == "cuda":
            _backend.extension().channel_absmax_cuda(
                x.data_ptr(), DTYPE_CODE[x.dtype], *view.args(), out.data_ptr(), ptr(counts),
                _backend.cuda_stream_ptr(x), ptr(lo), ptr(hi),
            )
        else:  # triton, imported on first use (an optional dependency)
            from sparsekern.triton.channel_absmax import channel_absmax_triton

            channel_absmax_triton(x, view, out, counts, lo, hi)
    return out, counts, lo, hi


def channel_absmax(x: torch.Tensor, *, count_positive: bool = False, backend: str = "auto"):
    """Per-(n, c) max |x| over all dims after dim 1, as an (N, C) float32 tensor.

    Accepts (N, C), (N, C, L), (N, C, H, W) and higher ranks; contiguous, channels_last or
    any strided view; float32, float16, bfloat16. ``backend``: auto|cuda|triton|cpp|torch.
    Returns ``m`` or, with ``count_positive=True``, ``(m, positive_counts)`` (int64).
    """
    check_activation(x, OP)
    if not traced(x):
        m, counts, _, _ = _run(x, bool(count_positive), False, backend, OP)
        return (m, counts) if count_positive else m
    # Through the registered op (sparsekern/ops/library.py): torch.compile traces it as one node.
    m, counts = torch.ops.sparsekern.channel_absmax(x, bool(count_positive), backend)
    return (m, counts) if count_positive else m


def channel_extrema(x: torch.Tensor, *, count_positive: bool = False, backend: str = "auto") -> ChannelExtrema:
    """Per-(n, c) max |x|, signed min and signed max over all dims after dim 1, in one kernel pass.

    Inputs and backends as for ``channel_absmax``. Returns a ``ChannelExtrema`` of (N, C)
    float32 tensors (and int64 positive counts with ``count_positive=True``). NaN and empty
    positions: see the module docstring.
    """
    if not isinstance(count_positive, bool):
        raise TypeError(f"{OP_EXTREMA}: count_positive must be a bool, got {type(count_positive).__name__}")
    check_activation(x, OP_EXTREMA)
    if not traced(x):
        m, counts, lo, hi = _run(x, count_positive, True, backend, OP_EXTREMA)
        return ChannelExtrema(m, lo, hi, counts)
    m, lo, hi, counts = torch.ops.sparsekern.channel_extrema(x, count_positive, backend)
    return ChannelExtrema(m, lo, hi, counts if count_positive else None)
