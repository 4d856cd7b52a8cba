"""channel_absmax: per-sample, per-channel max |x| over every position after the channel dim.

    m[n, c] = max_{p} |x[n, c, p]|        (float32 result)

With ``count_positive=True`` the same pass also counts, per (n, c), the elements > 0
(for APoZ, the average percentage of zeros of Hu et al. 2016).

NaN: a (n, c) that saw a NaN gets NaN in the result (never a number). +-Inf gives inf.
"""
from __future__ import annotations

import math

import torch

from sparsekern import _backend
from sparsekern._layout import DTYPE_CODE, as_view4, check_activation

OP = "channel_absmax"


def channel_absmax_reference(x: torch.Tensor, count_positive: bool = False):
    """Pure-torch definition; the oracle the kernels are tested against, and the last fallback."""
    n, c = x.shape[0], x.shape[1]
    # Explicit trailing size: reshape(n, c, -1) is ambiguous when n or c is 0.
    flat = x.reshape(n, c, math.prod(x.shape[2:]))
    if flat.shape[2] == 0:
        m = torch.zeros(n, c, dtype=torch.float32, device=x.device)
    else:
        # amax propagates NaN, which is exactly the contract.
        m = flat.abs().amax(dim=2).to(torch.float32)
    if not count_positive:
        return m
    return m, (flat > 0).sum(dim=2, dtype=torch.int64)


def channel_absmax(x: torch.Tensor, *, count_positive: bool = False, backend: str = "auto"):
    """Per-(n, c) max |x| over all dims after dim 1, as an (N, C) float32 tensor.

    Accepts (N, C), (N, C, L), (N, C, H, W) and higher ranks; contiguous, channels_last or
    any strided view; float32, float16, bfloat16. ``backend``: auto|cuda|triton|cpp|torch.
    Returns ``m`` or, with ``count_positive=True``, ``(m, positive_counts)`` (int64).
    """
    check_activation(x, OP)
    chosen = _backend.resolve(backend, x.device, op=OP)
    n, c = x.shape[0], x.shape[1]
    if x.numel() == 0 or chosen == "torch":
        return channel_absmax_reference(x, count_positive)
    x, view = as_view4(x)
    out = torch.empty(n, c, dtype=torch.float32, device=x.device)
    counts = torch.empty(n, c, dtype=torch.int64, device=x.device) if count_positive else None
    counts_ptr = counts.data_ptr() if counts is not None else 0
    with _backend.cuda_device(x):  # every kernel launches on the current device: make it x's
        if chosen == "cpp":
            _backend.extension().channel_absmax_cpu(
                x.data_ptr(), DTYPE_CODE[x.dtype], *view.args(), out.data_ptr(), counts_ptr
            )
        elif chosen == "cuda":
            _backend.extension().channel_absmax_cuda(
                x.data_ptr(), DTYPE_CODE[x.dtype], *view.args(), out.data_ptr(), counts_ptr,
                _backend.cuda_stream_ptr(x),
            )
        else:  # triton, imported on first use (an optional dependency)
            from sparsekern.triton.channel_absmax import channel_absmax_triton

            channel_absmax_triton(x, view, out, counts)
    return (out, counts) if count_positive else out
