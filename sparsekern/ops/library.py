"""The ``torch.library`` registrations of the statistics ops (namespace ``sparsekern``), so that
``torch.compile(fullgraph=True)`` traces through them instead of breaking the graph at an opaque
pybind11 call:

    torch.ops.sparsekern.channel_absmax(x, count_positive, backend) -> (max, positive)
    torch.ops.sparsekern.channel_extrema(x, count_positive, backend) -> (max, min, max_signed, positive)
    torch.ops.sparsekern.channel_stats_update_(x, <accumulators, mutated>, ...) -> maxima or empty

Each is a Python ``custom_op`` over the existing torch-free pointer ABI (``sparsekern._C``), the
Triton launchers or the torch reference, with a fake (meta) implementation that gives the output
shapes without running anything. ``positive`` is an empty int64 tensor when ``count_positive`` is
False (a custom op cannot return None). The public functions in ``channel_absmax.py`` and
``channel_stats_update.py`` call these ops; ``backend`` is resolved when the op runs, so an
explicitly requested backend that is unavailable raises ``BackendUnavailableError`` then.

None of these ops has an autograd formula: their outputs are statistics (maxima, counts), not
differentiable values, and callers measure under ``torch.no_grad()`` on detached tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from sparsekern.ops.channel_absmax import OP, OP_EXTREMA, _run
from sparsekern.ops.channel_stats_update import channel_stats_update_impl

Tensor = torch.Tensor
# The kernels read any strides (sparsekern._layout.as_view4): without this tag inductor would copy
# a channels_last activation into the eager layout before every call.
_ANY_LAYOUT = (torch.Tag.flexible_layout,)


def _nc(x: Tensor, dtype: torch.dtype, keep: bool = True) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1]) if keep else (0,), dtype=dtype)


@torch.library.custom_op("sparsekern::channel_absmax", mutates_args=(), tags=_ANY_LAYOUT)
def channel_absmax_op(x: Tensor, count_positive: bool, backend: str) -> tuple[Tensor, Tensor]:
    m, counts, _, _ = _run(x, count_positive, False, backend, OP)
    return m, counts if counts is not None else _nc(x, torch.int64, False)


@channel_absmax_op.register_fake
def _(x, count_positive, backend):
    return _nc(x, torch.float32), _nc(x, torch.int64, count_positive)


@torch.library.custom_op("sparsekern::channel_extrema", mutates_args=(), tags=_ANY_LAYOUT)
def channel_extrema_op(x: Tensor, count_positive: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m, counts, lo, hi = _run(x, count_positive, True, backend, OP_EXTREMA)
    return m, lo, hi, counts if counts is not None else _nc(x, torch.int64, False)


@channel_extrema_op.register_fake
def _(x, count_positive, backend):
    f = _nc(x, torch.float32)
    return f, torch.empty_like(f), torch.empty_like(f), _nc(x, torch.int64, count_positive)


@torch.library.custom_op(
    "sparsekern::channel_stats_update_",
    mutates_args=("mx", "nan_samples", "inf_samples", "pos", "value_min", "value_max", "host", "histogram",
                  "pass2_counts", "pass2_max", "pass2_samples"),
    tags=_ANY_LAYOUT,
)
def channel_stats_update_op(x: Tensor, mx: Tensor, nan_samples: Tensor, inf_samples: Tensor, pos: Tensor,
                            value_min: Tensor, value_max: Tensor, host: Tensor, histogram: Optional[Tensor],
                            hist_bits: int, reference: Optional[Tensor], thresholds: Optional[Tensor],
                            pass2_counts: Optional[Tensor], pass2_max: Optional[Tensor],
                            pass2_samples: Optional[Tensor], enabled: Optional[Tensor],
                            keep_maxima: bool, backend: str) -> Tensor:
    return channel_stats_update_impl(x, mx, nan_samples, inf_samples, pos, value_min, value_max, host, histogram,
                                     hist_bits, reference, thresholds, pass2_counts, pass2_max, pass2_samples, enabled,
                                     keep_maxima, backend)


@channel_stats_update_op.register_fake
def _(x, mx, nan_samples, inf_samples, pos, value_min, value_max, host, histogram, hist_bits, reference, thresholds,
      pass2_counts, pass2_max, pass2_samples, enabled, keep_maxima, backend):
    return _nc(x, torch.float32, keep_maxima)
