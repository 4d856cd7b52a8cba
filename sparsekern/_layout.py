"""The activation contract every kernel shares: dtype / rank checks and the (N, C, R, L) view.

A leaf (imports torch only): the ops (``sparsekern.ops``), their Triton launchers and the
statistics (``sparsekern.stats``) all validate activations and address them through it, so
none of them imports another for it.

Kernels see a tensor as four dims: N (samples), C (channels), then the positions after
the channel dim folded into at most two dims R x L with element strides. Folding trailing
dims costs nothing when their strides allow it (contiguous NCHW becomes R=1, L=H*W;
channels_last becomes R=1, L=H*W with stride_l = C), so no copy is made for the layouts
that matter; an input whose trailing dims cannot be folded into two is copied once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass(frozen=True)
class View4:
    n: int
    c: int
    r: int
    l: int
    sn: int
    sc: int
    sr: int
    sl: int

    def args(self) -> tuple[int, ...]:
        return (self.n, self.c, self.r, self.l, self.sn, self.sc, self.sr, self.sl)


def check_activation(x: torch.Tensor, op: str) -> None:
    """Reject what no kernel can give a meaningful answer for, naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        kind = "complex" if x.is_complex() else ("integer/bool" if not x.is_floating_point() else "floating")
        raise TypeError(
            f"{op}: unsupported dtype {x.dtype} ({kind}); expected float32, float16 or bfloat16 activations"
        )
    if x.dim() < 2:
        raise ValueError(
            f"{op}: expected an activation of shape (N, C, ...) with rank >= 2, got shape {tuple(x.shape)}"
        )


def _fold(sizes: list[int], strides: list[int]) -> tuple[list[int], list[int]]:
    """Merge adjacent dims (outer, inner) when stride_outer == size_inner * stride_inner."""
    out_s, out_t = [], []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue  # a size-1 dim never affects addressing
        if out_s and out_t[-1] == size * stride:
            out_s[-1] *= size
            out_t[-1] = stride
        else:
            out_s.append(size)
            out_t.append(stride)
    return out_s, out_t


def as_view4(x: torch.Tensor) -> tuple[torch.Tensor, View4]:
    """Return (tensor to read, its (N, C, R, L) view). Copies only if the dims cannot fold."""
    n, c = x.shape[0], x.shape[1]
    sizes, strides = _fold(list(x.shape[2:]), list(x.stride()[2:]))
    if len(sizes) > 2:
        # e.g. a 5-D tensor with a permuted middle dim: one copy into NC(...) order.
        x = x.contiguous()
        sizes, strides = _fold(list(x.shape[2:]), list(x.stride()[2:]))
    if len(sizes) == 0:
        sizes, strides = [1, 1], [1, 1]
    elif len(sizes) == 1:
        sizes, strides = [1, sizes[0]], [sizes[0] * strides[0], strides[0]]
    return x, View4(n, c, sizes[0], sizes[1], x.stride(0), x.stride(1), strides[0], strides[1])
