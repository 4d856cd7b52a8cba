"""channel_stats_update_: one batch of activations folded into the per-channel statistics, in place.

    m[n, c]   = max_p |x[n, c, p]|,  pos[n, c] = #{p : x[n, c, p] > 0},
    lo / hi   = min_p / max_p x[n, c, p]                       (NaN for a (n, c) that saw a NaN)

and, per channel c (every accumulator is updated in place; ``ChannelStats`` owns them):

    max[c]          = max(max[c], max over non-NaN samples of m[n, c])
    nan_samples[c] += #{n : m[n, c] is NaN},   inf_samples[c] += #{n : m[n, c] is +Inf}
    positive[c]    += sum_n pos[n, c]
    value_min[c]    = min(value_min[c], min over non-NaN samples of lo[n, c])   (value_max alike)
    histogram[c, b]+= #{n : bucket(m[n, c]) = b}     (optional; the bucket rule of stores/histogram.py)
    pass2_counts[c, i] += #{n : m[n, c] / reference[c] < thresholds[i]}   (float64; optional, two-pass)
    pass2_max[c]    = max(pass2_max[c], batch max)                         (with the two-pass counts)
    host           += [N, N * positions, N, N]    (int64 (4,): samples, positions, APoZ / range samples)
    pass2_samples  += N                                                     (int64 (), with the two-pass counts)

``host`` and ``pass2_samples`` are CPU tensors (the sample counts are known from shapes: keeping
them on the host means reading them never synchronises with a GPU).

``enabled`` (a 0-dim bool tensor, or None for always): when False nothing changes (the tracker's
``every=k`` sampling; read on the host, so keep it a CPU tensor). The (N, C) maxima are returned
only with ``keep_maxima=True`` (the per-sample stores "exact" / "memmap"); otherwise an empty
tensor and, on the fused backends, no (N, C) tensor is ever made.

Backends: ``cpp`` runs one fused C++ call (the dispatched per-(n, c) pass into a scratch buffer of
the call, then the per-channel accumulation, parallel over channels: no (N, C) torch tensor);
``triton`` one fused kernel launch (atomics into the accumulators; see sparsekern/triton/
channel_absmax.py); ``cuda`` one C++ call too (the channel_absmax kernels into stream-ordered scratch, then one
accumulation kernel: two launches; compiled here but never run, as no GPU was available; the
GPU cases of python_tests/test_custom_ops.py check it); ``torch`` is the reference,
``channel_stats_update_reference``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from sparsekern import _backend
from sparsekern._layout import DTYPE_CODE, as_view4, check_activation
from sparsekern.ops.channel_absmax import OP_EXTREMA, _run

OP = "channel_stats_update_"
HOST_FIELDS = ("num_samples", "elements", "apoz_samples", "range_samples")


def histogram_buckets(m: torch.Tensor, bits: int, num_buckets: int) -> torch.Tensor:
    """The histogram bucket of every maximum m (float32, >= 0 or NaN / Inf): 0 for exact zeros,
    1 + (float bits >> (23 - bits)) for positive finite values, the last bucket for NaN / Inf."""
    key = (m.view(torch.int32) >> (23 - bits)) + 1
    finite = torch.isfinite(m)
    bucket = torch.where(finite & (m > 0), key, 0)
    return torch.where(finite, bucket, num_buckets - 1)


def accumulate_reference(m, positive, lo, hi, positions: int, mx, nan_samples, inf_samples, pos, value_min,
                         value_max, host, histogram, hist_bits, reference, thresholds, pass2_counts, pass2_max,
                         pass2_samples):
    """Fold per-sample (N, C) results into the per-channel accumulators with torch ops."""
    n = m.shape[0]
    nan = torch.isnan(m)
    nan_samples += nan.sum(dim=0)
    inf_samples += torch.isinf(m).sum(dim=0)
    batch_max = torch.where(nan, 0.0, m).amax(dim=0)
    torch.maximum(mx, batch_max, out=mx)
    pos += positive.sum(dim=0)
    bad = torch.isnan(lo) | torch.isnan(hi)
    torch.minimum(value_min, torch.where(bad, float("inf"), lo).amin(dim=0), out=value_min)
    torch.maximum(value_max, torch.where(bad, float("-inf"), hi).amax(dim=0), out=value_max)
    if histogram is not None:
        buckets = histogram.shape[1]
        offsets = torch.arange(m.shape[1], device=m.device, dtype=torch.int64) * buckets
        flat = (histogram_buckets(m, hist_bits, buckets).to(torch.int64) + offsets).reshape(-1)
        histogram.view(-1).scatter_add_(0, flat, torch.ones_like(flat))
    if reference is not None:
        ratio = m.to(torch.float64) / reference.to(torch.float64)
        pass2_counts += (ratio.unsqueeze(-1) < thresholds.to(torch.float64)).sum(dim=0)
        torch.maximum(pass2_max, batch_max, out=pass2_max)
    _count_host(host, pass2_samples, n, positions)


def _count_host(host, pass2_samples, n: int, positions: int) -> None:
    host += torch.tensor([n, n * positions, n, n], dtype=torch.int64)
    if pass2_samples is not None:
        pass2_samples += n


def channel_stats_update_reference(x, mx, nan_samples, inf_samples, pos, value_min, value_max, host,
                                   histogram=None, hist_bits=3, reference=None, thresholds=None, pass2_counts=None,
                                   pass2_max=None, pass2_samples=None, keep_maxima=False):
    """Pure-torch definition (the oracle the fused kernels are tested against); returns the maxima
    (N, C) with ``keep_maxima`` else an empty tensor."""
    r = _run(x, True, True, "torch", OP_EXTREMA)
    accumulate_reference(r[0], r[1], r[2], r[3], math.prod(x.shape[2:]), mx, nan_samples, inf_samples, pos,
                         value_min, value_max, host, histogram, hist_bits, reference, thresholds, pass2_counts,
                         pass2_max, pass2_samples)
    return r[0] if keep_maxima else r[0].new_empty(0)


def host_checksum(m: torch.Tensor) -> Optional[int]:
    """The checksum of ``sparsekern.stats.checksums.checksum`` (int64 sum of the maxima's bit
    patterns, NaN as -1, +-0.0 as 0) as a Python int, by the C++ extension in one pass over a
    contiguous float32 CPU ``m``; None when that does not apply (the caller uses torch ops)."""
    ext = _backend.extension()
    if ext is None or m.device.type != "cpu" or m.dtype != torch.float32 or not m.is_contiguous():
        return None
    return ext.maxima_checksum_cpu(m.data_ptr(), m.numel())


def _fused_cpp(x, maxima, mx, nan_samples, inf_samples, pos, value_min, value_max, histogram, hist_bits, reference,
               thresholds, pass2_counts, pass2_max, clamp=None) -> None:
    """``clamp``: (y, lo, hi), the clamp epilogue (y has x's strides, y may be x; x is not copied:
    the caller checked that ``as_view4`` reads x itself)."""
    x, view = as_view4(x)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    t64 = None if thresholds is None else thresholds.to(device="cpu", dtype=torch.float64).contiguous()
    y, lo, hi = (None, 0.0, 0.0) if clamp is None else clamp
    _backend.extension().channel_stats_cpu(
        x.data_ptr(), DTYPE_CODE[x.dtype], *view.args(), ptr(maxima),
        mx.data_ptr(), nan_samples.data_ptr(), inf_samples.data_ptr(), pos.data_ptr(),
        value_min.data_ptr(), value_max.data_ptr(),
        ptr(histogram), 0 if histogram is None else histogram.shape[1], hist_bits,
        ptr(reference), ptr(t64), 0 if t64 is None else t64.numel(), ptr(pass2_counts), ptr(pass2_max),
        ptr(y), lo, hi,
    )


def _fused_cuda(x, maxima, mx, nan_samples, inf_samples, pos, value_min, value_max, histogram, hist_bits, reference,
                thresholds, pass2_counts, pass2_max) -> None:
    x, view = as_view4(x)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    t64 = None if thresholds is None else thresholds.to(device=x.device, dtype=torch.float64).contiguous()
    _backend.extension().channel_stats_cuda(
        x.data_ptr(), DTYPE_CODE[x.dtype], *view.args(), ptr(maxima),
        mx.data_ptr(), nan_samples.data_ptr(), inf_samples.data_ptr(), pos.data_ptr(),
        value_min.data_ptr(), value_max.data_ptr(),
        ptr(histogram), 0 if histogram is None else histogram.shape[1], hist_bits,
        ptr(reference), ptr(t64), 0 if t64 is None else t64.numel(), ptr(pass2_counts), ptr(pass2_max),
        _backend.cuda_stream_ptr(x),
    )


def _check_state(x, mx, nan_samples, inf_samples, pos, value_min, value_max, host, histogram, hist_bits, reference,
                 thresholds, pass2_counts, pass2_max, pass2_samples) -> None:
    """Raise ValueError unless the accumulators (the op's arguments from ``mx`` to ``pass2_samples``)
    fit x."""
    tensors = {"max": (mx, torch.float32), "nan_samples": (nan_samples, torch.int64),
               "inf_samples": (inf_samples, torch.int64), "positive": (pos, torch.int64),
               "value_min": (value_min, torch.float32), "value_max": (value_max, torch.float32)}
    c = x.shape[1]
    for name, (t, dtype) in tensors.items():
        if t.dtype != dtype or tuple(t.shape) != (c,) or t.device != x.device or not t.is_contiguous():
            raise ValueError(f"{OP}: {name} must be a contiguous {dtype} tensor of shape ({c},) on {x.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if host.dtype != torch.int64 or tuple(host.shape) != (len(HOST_FIELDS),) or host.device.type != "cpu":
        raise ValueError(f"{OP}: host must be a CPU int64 tensor of shape ({len(HOST_FIELDS)},)")
    if histogram is not None and (histogram.dtype != torch.int64 or histogram.dim() != 2 or histogram.shape[0] != c
                                  or histogram.device != x.device or not histogram.is_contiguous()):
        raise ValueError(f"{OP}: histogram must be a contiguous int64 ({c}, buckets) tensor on {x.device}")
    two_pass = (reference, thresholds, pass2_counts, pass2_max, pass2_samples)
    if any(t is None for t in two_pass) and not all(t is None for t in two_pass):
        raise ValueError(f"{OP}: give reference, thresholds, pass2_counts, pass2_max and pass2_samples together, "
                         "or none")
    if reference is not None:
        k = thresholds.numel()
        if (pass2_counts.dtype != torch.int64 or tuple(pass2_counts.shape) != (c, k)
                or not pass2_counts.is_contiguous() or reference.dtype != torch.float32
                or pass2_max.dtype != torch.float32):
            raise ValueError(f"{OP}: two-pass state of the wrong dtype or shape")


def channel_stats_update_impl(x: torch.Tensor, mx: torch.Tensor, nan_samples: torch.Tensor, inf_samples: torch.Tensor,
                              pos: torch.Tensor, value_min: torch.Tensor, value_max: torch.Tensor, host: torch.Tensor,
                              histogram: Optional[torch.Tensor], hist_bits: int, reference: Optional[torch.Tensor],
                              thresholds: Optional[torch.Tensor], pass2_counts: Optional[torch.Tensor],
                              pass2_max: Optional[torch.Tensor], pass2_samples: Optional[torch.Tensor],
                              enabled: Optional[torch.Tensor], keep_maxima: bool,
                              backend: str) -> torch.Tensor:
    """The eager body of ``torch.ops.sparsekern.channel_stats_update_`` (see the module docstring)."""
    n, c = x.shape[0], x.shape[1]
    empty = torch.empty((n, c) if keep_maxima else (0,), dtype=torch.float32, device=x.device)
    if enabled is not None and not bool(enabled):
        return empty.zero_()  # defined values (opcheck compares outputs); nothing else changes
    check_activation(x, OP)
    _check_state(x, mx, nan_samples, inf_samples, pos, value_min, value_max, host, histogram, hist_bits, reference,
                 thresholds, pass2_counts, pass2_max, pass2_samples)
    if n == 0:
        return empty
    chosen = _backend.resolve(backend, x.device, op=OP)
    positions = math.prod(x.shape[2:])
    if chosen == "cpp" and x.numel() and hasattr(_backend.extension(), "channel_stats_cpu"):
        maxima = empty if keep_maxima else None
        _fused_cpp(x, maxima, mx, nan_samples, inf_samples, pos, value_min, value_max, histogram, hist_bits,
                   reference, thresholds, pass2_counts, pass2_max)
        _count_host(host, pass2_samples, n, positions)
        return empty
    if chosen == "cuda" and x.numel() and hasattr(_backend.extension(), "channel_stats_cuda"):
        with _backend.cuda_device(x):
            _fused_cuda(x, empty if keep_maxima else None, mx, nan_samples, inf_samples, pos, value_min, value_max,
                        histogram, hist_bits, reference, thresholds, pass2_counts, pass2_max)
        _count_host(host, pass2_samples, n, positions)
        return empty
    if chosen == "triton" and x.numel():
        from sparsekern.triton.channel_absmax import channel_stats_triton

        with _backend.cuda_device(x):
            channel_stats_triton(x, empty if keep_maxima else None, mx, nan_samples, inf_samples, pos, value_min,
                                 value_max, histogram, hist_bits, reference, thresholds, pass2_counts, pass2_max)
        _count_host(host, pass2_samples, n, positions)
        return empty
    # torch and cuda (two steps: the extrema kernel, then torch ops), and empty positions
    m, positive, lo, hi = _run(x, True, True, chosen, OP_EXTREMA)
    accumulate_reference(m, positive, lo, hi, positions, mx, nan_samples, inf_samples, pos, value_min, value_max,
                         host, histogram, hist_bits, reference, thresholds, pass2_counts, pass2_max, pass2_samples)
    return m if keep_maxima else empty


def clamp_stats_update_impl(x: torch.Tensor, y: torch.Tensor, lo: float, hi: float, *state, keep_maxima: bool,
                            backend: str) -> torch.Tensor:
    """``y = clamp(x, lo, hi)`` (``y`` may be ``x``: in place) and the statistics of ``y`` folded in as
    ``channel_stats_update_impl(y, *state, None, keep_maxima, backend)`` would (same return value): a
    ReLU (lo = 0, hi = inf) or ReLU6 / Hardtanh and its measurement in one pass over the activation.

    ``state`` is channel_stats_update_impl's arguments from ``mx`` to ``pass2_samples``. The clamp
    is torch.clamp's, bit for bit (-0.0 and NaN pass through). One fused C++ call on the cpp
    backend for a float32 ``x`` that it reads in place (dense, rank <= 4, ``y`` with x's strides);
    otherwise torch.clamp, then the statistics update. Eager only (not a registered op: analyze's
    no-grad forwards use it, never a traced graph).
    """
    if y is not x and (y.shape != x.shape or y.dtype != x.dtype or y.device != x.device):
        raise ValueError(f"clamp_stats_update: y must match x's shape, dtype and device, got {tuple(y.shape)} "
                         f"{y.dtype} {y.device} for x {tuple(x.shape)} {x.dtype} {x.device}")
    if _fused_clamp_applies(x, y, backend):
        check_activation(x, OP)
        _check_state(x, *state)
        mx, nan_samples, inf_samples, pos, value_min, value_max, host, histogram, hist_bits, reference, \
            thresholds, pass2_counts, pass2_max, pass2_samples = state
        maxima = torch.empty((x.shape[0], x.shape[1]) if keep_maxima else (0,), dtype=torch.float32)
        _fused_cpp(x, maxima if keep_maxima else None, mx, nan_samples, inf_samples, pos, value_min, value_max,
                   histogram, hist_bits, reference, thresholds, pass2_counts, pass2_max, clamp=(y, float(lo), float(hi)))
        _count_host(host, pass2_samples, x.shape[0], math.prod(x.shape[2:]))
        return maxima
    torch.clamp(x, lo, hi, out=y)
    return channel_stats_update_impl(y, *state, None, keep_maxima, backend)


def _fused_clamp_applies(x: torch.Tensor, y: torch.Tensor, backend: str) -> bool:
    """Whether the fused C++ clamp + statistics pass can run on (x, y) exactly as asked."""
    if x.dtype != torch.float32 or x.dim() < 2 or x.dim() > 4 or x.shape[0] == 0 or x.numel() == 0:
        return False
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    if not dense or y.stride() != x.stride():
        return False
    if _backend.resolve(backend, x.device, op=OP) != "cpp" or not hasattr(_backend.extension(), "channel_stats_cpu"):
        return False
    # y may alias x only as x itself (an element is read before it is written, by the same thread).
    return y is x or y.data_ptr() == x.data_ptr() or not _overlap(x, y)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    size = a.numel() * a.element_size()
    return a.data_ptr() < b.data_ptr() + size and b.data_ptr() < a.data_ptr() + size
