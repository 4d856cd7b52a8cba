"""Triton kernels for channel_absmax: out[n, c] = max |x[n, c, r, l]|, NaN-propagating; with
RANGE also the signed min and max of x[n, c] from the same pass (NaN where out is NaN, +inf /
-inf over no positions; a zero min / max may be +0.0 or -0.0).

Two kernels, picked by layout in :func:`channel_absmax_triton`:

* ``_rows_kernel``: a program owns BLOCK_ROWS consecutive (n, c) pairs and reads each pair's
  positions in BLOCK_L chunks. Fast when positions are contiguous (stride_l == 1, NCHW);
  with other strides it is the general path.
* ``_channels_kernel``: a program owns one sample n and BLOCK_C consecutive channels and
  walks the positions; with stride_c == 1 (channels_last, (N, C)) every position is one
  contiguous run of channels, so loads are coalesced.

Positions are visited as "chunks": chunk k is row r = k // chunks_per_row, columns
[(k % chunks_per_row) * BLOCK, ...). Splitting the chunk range over a second grid axis
keeps the GPU busy when N * C alone gives too few programs (for example N=1 and large
feature maps); each split then writes a partial row that torch combines afterwards.

NaN is tracked with an explicit flag (``v != v``): hardware max drops NaN operands (and the
interpreter's numpy max keeps them), so the max itself is never trusted to carry it.
Offsets are int64 so tensors beyond 2**31 elements address correctly.

Compiled or interpreted (CPU tensors, TRITON_INTERPRET=1 before triton is imported): see
sparsekern/triton/_utils.py, which also plans the grid and its split.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern._layout import View4, as_view4
from sparsekern.triton._utils import check_device, interpreting, partial_buffer, plan_splits, pow2, target_programs

OP = "channel_absmax"


@triton.jit
def _start(split, chunks_per_split, R, chunks_per_row, D0: tl.constexpr, D1: tl.constexpr):
    """This split's chunk range [first, last) and the initial [D0, D1] tiles of max, NaN flag,
    count, min and max (the last two at the identities +inf / -inf)."""
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, R * chunks_per_row)
    mx = tl.zeros([D0, D1], dtype=tl.float32)
    bad = tl.zeros([D0, D1], dtype=tl.int1)
    pos = tl.zeros([D0, D1], dtype=tl.int32)
    lo = tl.full([D0, D1], float("inf"), dtype=tl.float32)
    hi = tl.full([D0, D1], float("-inf"), dtype=tl.float32)
    return first, last, mx, bad, pos, lo, hi


@triton.jit
def _accumulate(x_ptr, offs, mask, mx, bad, pos, lo, hi, COUNT: tl.constexpr, RANGE: tl.constexpr):
    """One tile of either kernel's loop: running max |x|, NaN flags, (with COUNT) counts of x > 0
    and (with RANGE) the signed min and max; masked-off lanes leave the min and max alone."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mx = tl.maximum(mx, tl.abs(v))
    bad = bad | (v != v)
    if COUNT:
        pos += (v > 0.0).to(tl.int32)
    if RANGE:  # a NaN is flagged in `bad`; what minimum / maximum make of it is overridden at the store
        lo = tl.minimum(lo, tl.where(mask, v, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, v, float("-inf")))
    return mx, bad, pos, lo, hi


@triton.jit
def _store(out_ptr, count_ptr, lo_ptr, hi_ptr, dst, ok, mx, bad, pos, lo, hi, AXIS: tl.constexpr,
           COUNT: tl.constexpr, RANGE: tl.constexpr):
    """Reduce the tiles along AXIS (the positions) and write one result per (n, c): NaN if any was."""
    m = tl.max(mx, axis=AXIS)
    nan = tl.max(bad.to(tl.int32), axis=AXIS) > 0
    tl.store(out_ptr + dst, tl.where(nan, float("nan"), m), mask=ok)
    if COUNT:
        tl.store(count_ptr + dst, tl.sum(pos.to(tl.int64), axis=AXIS), mask=ok)
    if RANGE:
        tl.store(lo_ptr + dst, tl.where(nan, float("nan"), tl.min(lo, axis=AXIS)), mask=ok)
        tl.store(hi_ptr + dst, tl.where(nan, float("nan"), tl.max(hi, axis=AXIS)), mask=ok)


@triton.jit
def _rows_kernel(
    x_ptr, out_ptr, count_ptr, lo_ptr, hi_ptr,
    rows, C, R, L, sn, sc, sr, sl,
    chunks_per_split,
    COUNT: tl.constexpr, RANGE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    split = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = t < rows
    row_base = (t // C) * sn + (t % C) * sc
    lane = tl.arange(0, BLOCK_L)

    chunks_per_row = tl.cdiv(L, BLOCK_L)
    first, last, mx, bad, pos, lo, hi = _start(split, chunks_per_split, R, chunks_per_row, BLOCK_ROWS, BLOCK_L)
    for k in range(first, last):
        r = k // chunks_per_row
        col = (k - r * chunks_per_row) * BLOCK_L + lane
        offs = row_base[:, None] + (r * sr + col * sl)[None, :]
        mask = row_ok[:, None] & (col < L)[None, :]
        mx, bad, pos, lo, hi = _accumulate(x_ptr, offs, mask, mx, bad, pos, lo, hi, COUNT, RANGE)
    _store(out_ptr, count_ptr, lo_ptr, hi_ptr, split * rows + t, row_ok, mx, bad, pos, lo, hi, 1, COUNT, RANGE)


@triton.jit
def _channels_kernel(
    x_ptr, out_ptr, count_ptr, lo_ptr, hi_ptr,
    N, C, R, L, sn, sc, sr, sl,
    chunks_per_split,
    COUNT: tl.constexpr, RANGE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    split = tl.program_id(1).to(tl.int64)
    channel_blocks = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // channel_blocks).to(tl.int64)
    c = (tl.program_id(0) % channel_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = n * sn + c * sc
    lane = tl.arange(0, BLOCK_P)

    chunks_per_row = tl.cdiv(L, BLOCK_P)
    # Tile is [positions, channels]: channels vary fastest, matching memory when sc == 1.
    first, last, mx, bad, pos, lo, hi = _start(split, chunks_per_split, R, chunks_per_row, BLOCK_P, BLOCK_C)
    for k in range(first, last):
        r = k // chunks_per_row
        col = (k - r * chunks_per_row) * BLOCK_P + lane
        offs = (r * sr + col * sl)[:, None] + base[None, :]
        mask = (col < L)[:, None] & c_ok[None, :]
        mx, bad, pos, lo, hi = _accumulate(x_ptr, offs, mask, mx, bad, pos, lo, hi, COUNT, RANGE)
    _store(out_ptr, count_ptr, lo_ptr, hi_ptr, split * N * C + n * C + c, c_ok, mx, bad, pos, lo, hi, 0, COUNT,
           RANGE)


# Elements per program per loop iteration: enough bytes in flight per program for bandwidth,
# few enough registers (three accumulator tiles, five with RANGE) to keep several programs per SM.
TILE = 2048


def channel_absmax_triton(x: torch.Tensor, view: View4, out: torch.Tensor, counts: torch.Tensor | None,
                          lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> None:
    """Fill ``out`` (N, C) float32 with max |x| per (n, c), ``counts`` (N, C) int64 if given, and
    ``lo`` / ``hi`` (N, C) float32 (both or neither) with the signed min / max, in one pass.

    ``x`` is read through ``view`` (see sparsekern._layout.as_view4), on the current device
    (the op selects it). CUDA tensors run the compiled kernels; CPU tensors need the Triton
    interpreter (TRITON_INTERPRET=1 before triton is imported).
    """
    rows = view.n * view.c
    count = counts is not None
    if (lo is None) != (hi is None):
        raise ValueError(f"{OP}: give both lo and hi, or neither")
    ranged = lo is not None
    if rows == 0 or view.r * view.l == 0:
        out.zero_()  # the max over no positions is 0, as in the reference
        if count:
            counts.zero_()
        if ranged:  # and the min / max over nothing are the identities
            lo.fill_(float("inf"))
            hi.fill_(float("-inf"))
        return
    # Under the interpreter the kernels run CPU tensors (and CUDA ones, slowly, through host copies).
    interpret = interpreting(OP, _rows_kernel)
    check_device(OP, x, interpret)
    if interpret and x.dtype == torch.bfloat16:
        # The interpreter emulates bf16 -> fp32 and gets subnormals wrong; torch's upcast is exact
        # (a bf16 is the top half of a float32), so the result is unchanged. Interpreter only.
        x, view = as_view4(x.float())
    target = target_programs(x, interpret)

    if (view.sl == 1 and view.l >= 16) or view.sc != 1:
        # Rows: contiguous positions, and also the general strided path. (as_view4 already
        # merged back-to-back rows, so R > 1 here means the rows really are apart.)
        block_l = min(pow2(view.l), 1024)
        block_rows = min(max(TILE // block_l, 1), pow2(rows))
        programs = triton.cdiv(rows, block_rows)
        splits, per_split = plan_splits(programs, view.r * triton.cdiv(view.l, block_l), target)
        kernel, grid = _rows_kernel, (programs, splits)
        sizes = (rows, view.c, view.r, view.l, view.sn, view.sc, view.sr, view.sl)
        meta = dict(BLOCK_ROWS=block_rows, BLOCK_L=block_l)
    else:
        # Channels: each position is a contiguous run of channels (channels_last, (N, C)).
        block_c = min(pow2(view.c), 128)
        block_p = min(max(TILE // block_c, 1), pow2(view.l))
        programs = view.n * triton.cdiv(view.c, block_c)
        splits, per_split = plan_splits(programs, view.r * triton.cdiv(view.l, block_p), target)
        kernel, grid = _channels_kernel, (programs, splits)
        sizes = (view.n, view.c, view.r, view.l, view.sn, view.sc, view.sr, view.sl)
        meta = dict(BLOCK_C=block_c, BLOCK_P=block_p)

    part_max, part_count = partial_buffer(out, splits), partial_buffer(counts, splits)
    part_lo, part_hi = partial_buffer(lo, splits), partial_buffer(hi, splits)
    kernel[grid](
        x, part_max, part_count if count else part_max,  # unused pointers when not counting / no range
        part_lo if ranged else part_max, part_hi if ranged else part_max,
        *sizes, per_split, COUNT=count, RANGE=ranged, num_warps=4, **meta,
    )
    if splits > 1:
        torch.amax(part_max, dim=0, out=out)  # amax propagates a split's NaN
        if count:
            torch.sum(part_count, dim=0, out=counts)
        if ranged:  # a split that saw NaN wrote NaN: amin / amax propagate it
            torch.amin(part_lo, dim=0, out=lo)
            torch.amax(part_hi, dim=0, out=hi)


# --- the statistics update fused into the pass (sparsekern/ops/channel_stats_update.py) ---------
# The same two loops as above, with the per-(n, c) results folded into the per-channel accumulators
# by atomics instead of being stored: max / min / integer sums do not depend on the order in which
# the programs arrive, so the result is exact and deterministic. One program sees every position of
# its (n, c) pairs (no split over positions: a partial max cannot be put in a histogram bucket).


@triton.jit
def _fold(m_ptr, mx, bad, pos, lo, hi, dst, ch, ok, AXIS: tl.constexpr, mx_ptr, nan_ptr, inf_ptr, pos_ptr, vmin_ptr,
          vmax_ptr, hist_ptr, buckets, ref_ptr, thr_ptr, T, p2c_ptr, p2m_ptr, KEEP: tl.constexpr,
          HIST: tl.constexpr, BITS: tl.constexpr, TWO_PASS: tl.constexpr):
    m = tl.max(mx, axis=AXIS)
    nan = tl.max(bad.to(tl.int32), axis=AXIS) > 0
    if KEEP:
        tl.store(m_ptr + dst, tl.where(nan, float("nan"), m), mask=ok)
    m = tl.where(nan, 0.0, m)  # NaN samples do not enter the maxima
    inf = (m == float("inf")) & ~nan
    tl.atomic_max(mx_ptr + ch, m, mask=ok)
    tl.atomic_add(nan_ptr + ch, nan.to(tl.int64), mask=ok)
    tl.atomic_add(inf_ptr + ch, inf.to(tl.int64), mask=ok)
    tl.atomic_add(pos_ptr + ch, tl.sum(pos.to(tl.int64), axis=AXIS), mask=ok)
    tl.atomic_min(vmin_ptr + ch, tl.where(nan, float("inf"), tl.min(lo, axis=AXIS)), mask=ok)
    tl.atomic_max(vmax_ptr + ch, tl.where(nan, float("-inf"), tl.max(hi, axis=AXIS)), mask=ok)
    if HIST:
        key = (m.to(tl.int32, bitcast=True) >> (23 - BITS)) + 1
        bucket = tl.where(nan | inf, buckets - 1, tl.where(m > 0.0, key, 0)).to(tl.int64)
        tl.atomic_add(hist_ptr + ch * buckets + bucket, tl.full(bucket.shape, 1, tl.int64), mask=ok)
    if TWO_PASS:
        ratio = m.to(tl.float64) / tl.load(ref_ptr + ch, mask=ok, other=1.0).to(tl.float64)
        for i in range(T):
            below = (ratio < tl.load(thr_ptr + i)) & ~nan
            tl.atomic_add(p2c_ptr + ch * T + i, below.to(tl.int64), mask=ok)
        tl.atomic_max(p2m_ptr + ch, m, mask=ok)


@triton.jit
def _rows_stats_kernel(
    x_ptr, m_ptr, rows, C, R, L, sn, sc, sr, sl,
    mx_ptr, nan_ptr, inf_ptr, pos_ptr, vmin_ptr, vmax_ptr, hist_ptr, buckets, ref_ptr, thr_ptr, T, p2c_ptr, p2m_ptr,
    KEEP: tl.constexpr, HIST: tl.constexpr, BITS: tl.constexpr, TWO_PASS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = t < rows
    row_base = (t // C) * sn + (t % C) * sc
    lane = tl.arange(0, BLOCK_L)
    chunks_per_row = tl.cdiv(L, BLOCK_L)
    first, last, mx, bad, pos, lo, hi = _start(0, R * chunks_per_row, R, chunks_per_row, BLOCK_ROWS, BLOCK_L)
    for k in range(first, last):
        r = k // chunks_per_row
        col = (k - r * chunks_per_row) * BLOCK_L + lane
        offs = row_base[:, None] + (r * sr + col * sl)[None, :]
        mask = row_ok[:, None] & (col < L)[None, :]
        mx, bad, pos, lo, hi = _accumulate(x_ptr, offs, mask, mx, bad, pos, lo, hi, True, True)
    _fold(m_ptr, mx, bad, pos, lo, hi, t, t % C, row_ok, 1, mx_ptr, nan_ptr, inf_ptr, pos_ptr, vmin_ptr, vmax_ptr,
          hist_ptr, buckets, ref_ptr, thr_ptr, T, p2c_ptr, p2m_ptr, KEEP, HIST, BITS, TWO_PASS)


@triton.jit
def _channels_stats_kernel(
    x_ptr, m_ptr, N, C, R, L, sn, sc, sr, sl,
    mx_ptr, nan_ptr, inf_ptr, pos_ptr, vmin_ptr, vmax_ptr, hist_ptr, buckets, ref_ptr, thr_ptr, T, p2c_ptr, p2m_ptr,
    KEEP: tl.constexpr, HIST: tl.constexpr, BITS: tl.constexpr, TWO_PASS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    channel_blocks = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // channel_blocks).to(tl.int64)
    c = (tl.program_id(0) % channel_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = n * sn + c * sc
    lane = tl.arange(0, BLOCK_P)
    chunks_per_row = tl.cdiv(L, BLOCK_P)
    first, last, mx, bad, pos, lo, hi = _start(0, R * chunks_per_row, R, chunks_per_row, BLOCK_P, BLOCK_C)
    for k in range(first, last):
        r = k // chunks_per_row
        col = (k - r * chunks_per_row) * BLOCK_P + lane
        offs = (r * sr + col * sl)[:, None] + base[None, :]
        mask = (col < L)[:, None] & c_ok[None, :]
        mx, bad, pos, lo, hi = _accumulate(x_ptr, offs, mask, mx, bad, pos, lo, hi, True, True)
    _fold(m_ptr, mx, bad, pos, lo, hi, n * C + c, c, c_ok, 0, mx_ptr, nan_ptr, inf_ptr, pos_ptr, vmin_ptr, vmax_ptr,
          hist_ptr, buckets, ref_ptr, thr_ptr, T, p2c_ptr, p2m_ptr, KEEP, HIST, BITS, TWO_PASS)


def channel_stats_triton(x, maxima, mx, nan_samples, inf_samples, pos, value_min, value_max, histogram, hist_bits,
                         reference, thresholds, pass2_counts, pass2_max) -> None:
    """One launch: the statistics update of sparsekern.ops.channel_stats_update on the Triton
    backend (x with at least one position; the op checked every accumulator)."""
    x, view = as_view4(x)
    interpret = interpreting(OP, _rows_stats_kernel)
    check_device(OP, x, interpret)
    if interpret and x.dtype == torch.bfloat16:
        x, view = as_view4(x.float())  # as channel_absmax_triton: the interpreter's bf16 upcast is wrong
    rows = view.n * view.c
    hist, two = histogram is not None, reference is not None
    if two:
        thresholds = thresholds.to(device=x.device, dtype=torch.float64).contiguous()
    any_ptr = mx  # a valid pointer for the arguments a flag switches off
    state = (mx, nan_samples, inf_samples, pos, value_min, value_max, histogram if hist else any_ptr,
             histogram.shape[1] if hist else 1, reference if two else any_ptr, thresholds if two else any_ptr,
             thresholds.numel() if two else 0, pass2_counts if two else any_ptr, pass2_max if two else any_ptr)
    flags = dict(KEEP=maxima is not None, HIST=hist, BITS=hist_bits, TWO_PASS=two, num_warps=4)
    m_ptr = maxima if maxima is not None else any_ptr
    if (view.sl == 1 and view.l >= 16) or view.sc != 1:
        block_l = min(pow2(view.l), 1024)
        block_rows = min(max(TILE // block_l, 1), pow2(rows))
        _rows_stats_kernel[(triton.cdiv(rows, block_rows),)](
            x, m_ptr, rows, view.c, view.r, view.l, view.sn, view.sc, view.sr, view.sl, *state,
            BLOCK_ROWS=block_rows, BLOCK_L=block_l, **flags)
    else:
        block_c = min(pow2(view.c), 128)
        block_p = min(max(TILE // block_c, 1), pow2(view.l))
        _channels_stats_kernel[(view.n * triton.cdiv(view.c, block_c),)](
            x, m_ptr, view.n, view.c, view.r, view.l, view.sn, view.sc, view.sr, view.sl, *state,
            BLOCK_C=block_c, BLOCK_P=block_p, **flags)
