"""Triton kernel for bn_relu: y = relu(x * scale[c] + shift[c]), optional per-(n, c) max of y.

A program owns (sample n, a block of BLOCK_C channels) and a range of positions, walked in
tiles of [BLOCK_C, BLOCK_P]. The tile shape follows the layout: long along positions when they
are contiguous (NCHW rows), long along channels when channels are contiguous (channels_last,
(N, C)). When (n, channel block) pairs alone are too few to fill the GPU, the positions are
split over a second grid axis; each split writes a partial max and torch combines them
(amax propagates NaN).

Dead channels: the dead mask is not part of the load mask (a per-lane mask of unknown pattern
makes Triton split the loads of channels_last tiles into scalar ones); a tile's dead lanes are
loaded with the others and zeroed by a ``where`` before anything uses them, and a tile whose
channels are all dead skips its loads altogether (and its stores too with WRITE_DEAD off: the
caller says the output holds 0 there already). Loads and stores are masked only by the bounds
(c < C, p < P), whose pattern Triton can see.

NaN: ``v < 0`` is false for NaN, so relu(NaN) = NaN as in torch; the max carries NaN through
an explicit flag because hardware max drops NaN operands.

Compiled or interpreted (CPU tensors, TRITON_INTERPRET=1 before triton is imported): see
sparsekern/triton/_utils.py, which also plans the grid and its split. The interpreter converts
float32 to bfloat16 by truncation rather than round-to-nearest-even, so there the kernel writes
bfloat16 output as float32 and torch rounds it (bfloat16 loads are exact).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern._layout import View4
from sparsekern.triton._utils import check_device, interpreting, partial_buffer, plan_splits, pow2, target_programs

OP = "bn_relu"
# Elements per tile: enough bytes in flight per program, few enough registers.
TILE = 1024


@triton.jit
def _bn_relu_kernel(
    x_ptr, y_ptr, scale_ptr, shift_ptr, dead_ptr, max_ptr,
    N, C, P, L, tiles_per_split,
    x_sn, x_sc, x_sr, x_sl,
    y_sn, y_sc, y_sr, y_sl,
    HAS_DEAD: tl.constexpr, HAS_MAX: tl.constexpr, FLAT: tl.constexpr, WRITE_DEAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    cblocks = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // cblocks).to(tl.int64)
    c = (tl.program_id(0) % cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    c_ok = c < C
    live = c_ok
    any_live = 1
    if HAS_DEAD:
        live = live & (tl.load(dead_ptr + c, mask=c_ok, other=1) == 0)
        any_live = tl.max(live.to(tl.int32), axis=0)
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)[:, None]
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)[:, None]
    c64 = c[:, None].to(tl.int64)
    x_base = x_ptr + n * x_sn + c64 * x_sc
    y_base = y_ptr + n * y_sn + c64 * y_sc
    running = tl.zeros([BLOCK_C], dtype=tl.float32)
    saw_nan = tl.zeros([BLOCK_C], dtype=tl.int32)
    first = split.to(tl.int64) * tiles_per_split * BLOCK_P
    if any_live > 0:
        for t in range(0, tiles_per_split):
            p = first + t * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
            p_ok = p < P
            if FLAT:
                x_off = p * x_sl
                y_off = p * y_sl
            else:
                x_off = (p // L) * x_sr + (p % L) * x_sl
                y_off = (p // L) * y_sr + (p % L) * y_sl
            inside = c_ok[:, None] & p_ok[None, :]
            v = tl.load(x_base + x_off[None, :], mask=inside, other=0.0).to(tl.float32) * scale + shift
            # Dead lanes and positions past the end become 0 before anything uses them.
            v = tl.where(live[:, None] & inside, tl.where(v < 0, 0.0, v), 0.0)
            tl.store(y_base + y_off[None, :], v.to(y_ptr.dtype.element_ty), mask=inside)
            if HAS_MAX:
                is_nan = v != v
                saw_nan = tl.maximum(saw_nan, tl.max(is_nan.to(tl.int32), axis=1))
                running = tl.maximum(running, tl.max(tl.where(is_nan, 0.0, v), axis=1))
    elif WRITE_DEAD:  # every channel of this tile is dead: zeros, nothing read
        for t in range(0, tiles_per_split):
            p = first + t * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
            p_ok = p < P
            if FLAT:
                y_off = p * y_sl
            else:
                y_off = (p // L) * y_sr + (p % L) * y_sl
            zero = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            tl.store(y_base + y_off[None, :], zero.to(y_ptr.dtype.element_ty), mask=c_ok[:, None] & p_ok[None, :])
    if HAS_MAX:
        # Round the max as y was rounded (monotonic, so it equals the max of the stored y).
        running = running.to(y_ptr.dtype.element_ty).to(tl.float32)
        running = tl.where(saw_nan > 0, float("nan"), running)
        tl.store(max_ptr + split * N * C + n * C + c, running, mask=c_ok)


def _tile_shape(vx: View4, vy: View4) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): long along whichever dim is contiguous in memory."""
    positions = vx.r * vx.l
    if vx.sc == 1 and vy.sc == 1 and not (vx.sl == 1 and vx.l >= 16):
        block_c = min(pow2(vx.c), 128)
        block_p = min(max(TILE // block_c, 1), pow2(positions))
    else:
        block_p = min(pow2(positions), TILE)
        block_c = min(max(TILE // block_p, 1), pow2(vx.c))
    return block_c, block_p


def bn_relu_triton(
    x: torch.Tensor,
    vx: View4,
    scale: torch.Tensor,
    shift: torch.Tensor,
    dead: torch.Tensor | None,
    y: torch.Tensor,
    vy: View4,
    out_max: torch.Tensor | None,
    *,
    write_dead: bool = True,
) -> None:
    """Fill y (and out_max, (N, C) float32, if given). Inputs are validated by sparsekern.ops.bn_relu.

    x / y are addressed through their (N, C, R, L) views, on the current device (the op selects
    it); scale / shift are contiguous float32, dead a contiguous uint8 (C,) or None. CUDA tensors
    run the compiled kernel; CPU tensors need the Triton interpreter. y may be x (in place).
    write_dead=False: y already holds 0 in the dead channels; tiles of dead channels are not written.
    """
    interpret = interpreting(OP, _bn_relu_kernel)
    check_device(OP, x, interpret)
    round_in_torch = interpret and y.dtype == torch.bfloat16
    target = y
    if round_in_torch:  # the float32 stand-in starts as y, so untouched dead channels keep y's values
        target = torch.empty_strided(y.shape, y.stride(), dtype=torch.float32, device=y.device)
        target.copy_(y)
    block_c, block_p = _tile_shape(vx, vy)
    programs = vx.n * triton.cdiv(vx.c, block_c)
    splits, tiles_per_split = plan_splits(programs, triton.cdiv(vx.r * vx.l, block_p), target_programs(x, interpret))
    partial = partial_buffer(out_max, splits)
    flat = vx.r == 1 or (vx.sr == vx.l * vx.sl and vy.sr == vy.l * vy.sl)
    _bn_relu_kernel[(programs, splits)](
        x, target, scale, shift,
        dead if dead is not None else scale,  # placeholder pointers, never read without the flag
        partial if partial is not None else scale,
        vx.n, vx.c, vx.r * vx.l, vx.l, tiles_per_split,
        vx.sn, vx.sc, vx.sr, vx.sl,
        vy.sn, vy.sc, vy.sr, vy.sl,
        HAS_DEAD=dead is not None, HAS_MAX=out_max is not None, FLAT=flat, WRITE_DEAD=write_dead,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4,
    )
    if out_max is not None and splits > 1:
        torch.amax(partial, dim=0, out=out_max)  # amax propagates a split's NaN
    if round_in_torch:
        y.copy_(target)
        if out_max is not None:
            out_max.copy_(out_max.to(torch.bfloat16).to(torch.float32))
