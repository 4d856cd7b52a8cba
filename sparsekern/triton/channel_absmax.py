"""Triton kernels for channel_absmax: out[n, c] = max |x[n, c, r, l]|, NaN-propagating.

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

Interpreter mode (CPU tensors): triton decides when it is imported, from TRITON_INTERPRET,
whether ``@triton.jit`` functions (its own standard library included) compile or interpret.
So TRITON_INTERPRET=1 must be set before triton is first imported; the launcher checks that
the kernels really are interpreted before it accepts CPU tensors, and says so otherwise.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache

import torch
import triton
import triton.language as tl

from sparsekern._backend import BackendUnavailableError
from sparsekern.ops._layout import View4, as_view4


@triton.jit
def _rows_kernel(
    x_ptr, out_ptr, count_ptr,
    rows, C, R, L, sn, sc, sr, sl,
    chunks_per_split,
    COUNT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    split = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = t < rows
    row_base = (t // C) * sn + (t % C) * sc
    lane = tl.arange(0, BLOCK_L)

    chunks_per_row = tl.cdiv(L, BLOCK_L)
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, R * chunks_per_row)

    mx = tl.zeros([BLOCK_ROWS, BLOCK_L], dtype=tl.float32)
    bad = tl.zeros([BLOCK_ROWS, BLOCK_L], dtype=tl.int1)
    pos = tl.zeros([BLOCK_ROWS, BLOCK_L], dtype=tl.int32)
    for k in range(first, last):
        r = k // chunks_per_row
        col = (k - r * chunks_per_row) * BLOCK_L + lane
        offs = row_base[:, None] + (r * sr + col * sl)[None, :]
        mask = row_ok[:, None] & (col < L)[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mx = tl.maximum(mx, tl.abs(v))
        bad = bad | (v != v)
        if COUNT:
            pos += (v > 0.0).to(tl.int32)

    row_max = tl.max(mx, axis=1)
    row_nan = tl.max(bad.to(tl.int32), axis=1) > 0
    dst = split * rows + t
    tl.store(out_ptr + dst, tl.where(row_nan, float("nan"), row_max), mask=row_ok)
    if COUNT:
        tl.store(count_ptr + dst, tl.sum(pos.to(tl.int64), axis=1), mask=row_ok)


@triton.jit
def _channels_kernel(
    x_ptr, out_ptr, count_ptr,
    N, C, R, L, sn, sc, sr, sl,
    chunks_per_split,
    COUNT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    split = tl.program_id(1).to(tl.int64)
    channel_blocks = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // channel_blocks).to(tl.int64)
    c = (tl.program_id(0) % channel_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = n * sn + c * sc
    lane = tl.arange(0, BLOCK_P)

    chunks_per_row = tl.cdiv(L, BLOCK_P)
    first = split * chunks_per_split
    last = tl.minimum(first + chunks_per_split, R * chunks_per_row)

    # Tile is [positions, channels]: channels vary fastest, matching memory when sc == 1.
    mx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    bad = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int1)
    pos = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int32)
    for k in range(first, last):
        r = k // chunks_per_row
        col = (k - r * chunks_per_row) * BLOCK_P + lane
        offs = (r * sr + col * sl)[:, None] + base[None, :]
        mask = (col < L)[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mx = tl.maximum(mx, tl.abs(v))
        bad = bad | (v != v)
        if COUNT:
            pos += (v > 0.0).to(tl.int32)

    col_max = tl.max(mx, axis=0)
    col_nan = tl.max(bad.to(tl.int32), axis=0) > 0
    dst = split * N * C + n * C + c
    tl.store(out_ptr + dst, tl.where(col_nan, float("nan"), col_max), mask=c_ok)
    if COUNT:
        tl.store(count_ptr + dst, tl.sum(pos.to(tl.int64), axis=0), mask=c_ok)


# Elements per program per loop iteration: enough bytes in flight per program for bandwidth,
# few enough registers (three accumulator tiles) to keep several programs per SM.
TILE = 2048
# The interpreter runs programs one after another; a small "machine" there keeps the grid
# tiny and still exercises the split path on test-sized inputs.
INTERPRETER_PROGRAMS = 4


@lru_cache(maxsize=None)
def _target_programs(device_index: int) -> int:
    """About how many programs fill the GPU: a few per SM (queried at launch, never at import)."""
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _interpreting() -> bool:
    """Whether this process runs Triton interpreted, as fixed when triton was first imported.

    Triton's own library (``tl.max``) tells; our kernels must agree, which they do unless
    TRITON_INTERPRET changed between importing triton and importing this module.
    """
    triton_interprets = not isinstance(tl.max, triton.runtime.JITFunction)
    if triton_interprets != (not isinstance(_rows_kernel, triton.runtime.JITFunction)):
        raise BackendUnavailableError(
            "channel_absmax: TRITON_INTERPRET changed between importing triton and importing "
            f"sparsekern's Triton kernels (triton {'does' if triton_interprets else 'does not'} interpret, "
            "the kernels do the opposite); set it before triton is first imported"
        )
    return triton_interprets


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, v))


def _split(programs: int, total_chunks: int, target: int) -> tuple[int, int]:
    """(splits, chunks per split) so that programs * splits reaches about ``target``."""
    if programs >= target or total_chunks < 2:
        return 1, max(total_chunks, 1)
    wanted = min(triton.cdiv(target, programs), 65535)  # grid axis 1 is limited to 65535
    per_split = max(triton.cdiv(total_chunks, wanted), 2 if total_chunks >= 4 else 1)
    return triton.cdiv(total_chunks, per_split), per_split


def channel_absmax_triton(x: torch.Tensor, view: View4, out: torch.Tensor, counts: torch.Tensor | None) -> None:
    """Fill ``out`` (N, C) float32 with max |x| per (n, c), and ``counts`` (N, C) int64 if given.

    ``x`` is read through ``view`` (see sparsekern.ops._layout.as_view4). CUDA tensors run the
    compiled kernels; CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 at import).
    """
    rows = view.n * view.c
    count = counts is not None
    if rows == 0 or view.r * view.l == 0:
        out.zero_()  # the max over no positions is 0, as in the reference
        if count:
            counts.zero_()
        return
    # Under the interpreter the kernels run CPU tensors (and CUDA ones, slowly, through host copies).
    interpret = _interpreting()
    if x.device.type != "cuda" and not interpret:
        raise BackendUnavailableError(
            "channel_absmax: the triton backend runs CPU tensors only under the Triton interpreter, but "
            "triton was imported without TRITON_INTERPRET=1; set it before triton is first imported"
        )
    if interpret and x.dtype == torch.bfloat16:
        # The interpreter emulates bf16 -> fp32 and gets subnormals wrong; torch's upcast is exact
        # (a bf16 is the top half of a float32), so the result is unchanged. Interpreter only.
        x, view = as_view4(x.float())
    target = INTERPRETER_PROGRAMS if interpret else _target_programs(x.device.index or 0)

    if (view.sl == 1 and view.l >= 16) or view.sc != 1:
        # Rows: contiguous positions, and also the general strided path. (as_view4 already
        # merged back-to-back rows, so R > 1 here means the rows really are apart.)
        block_l = min(_pow2(view.l), 1024)
        block_rows = min(max(TILE // block_l, 1), _pow2(rows))
        programs = triton.cdiv(rows, block_rows)
        splits, per_split = _split(programs, view.r * triton.cdiv(view.l, block_l), target)
        kernel, grid = _rows_kernel, (programs, splits)
        sizes = (rows, view.c, view.r, view.l, view.sn, view.sc, view.sr, view.sl)
        meta = dict(BLOCK_ROWS=block_rows, BLOCK_L=block_l)
    else:
        # Channels: each position is a contiguous run of channels (channels_last, (N, C)).
        block_c = min(_pow2(view.c), 128)
        block_p = min(max(TILE // block_c, 1), _pow2(view.l))
        programs = view.n * triton.cdiv(view.c, block_c)
        splits, per_split = _split(programs, view.r * triton.cdiv(view.l, block_p), target)
        kernel, grid = _channels_kernel, (programs, splits)
        sizes = (view.n, view.c, view.r, view.l, view.sn, view.sc, view.sr, view.sl)
        meta = dict(BLOCK_C=block_c, BLOCK_P=block_p)

    if splits == 1:
        part_max, part_count = out, counts
    else:
        part_max = torch.empty(splits, view.n, view.c, dtype=torch.float32, device=x.device)
        part_count = torch.empty(splits, view.n, view.c, dtype=torch.int64, device=x.device) if count else None
    with torch.cuda.device(x.device) if not interpret else nullcontext():
        # Triton launches on the current device; make it x's (x may live on cuda:1).
        kernel[grid](
            x, part_max, part_count if count else part_max,  # unused pointer when not counting
            *sizes, per_split, COUNT=count, num_warps=4, **meta,
        )
    if splits > 1:
        torch.amax(part_max, dim=0, out=out)  # amax propagates a split's NaN
        if count:
            torch.sum(part_count, dim=0, out=counts)
