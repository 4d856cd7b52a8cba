"""What every Triton op needs to launch: the interpreter check, the program count and the split.

One interpreter strategy for all kernels: each is a plain ``@triton.jit`` function, and
Triton fixes at decoration time, from TRITON_INTERPRET, whether it compiles or interprets,
exactly as it did for its own library (``tl.max``, ``tl.cdiv`` are ``@triton.jit`` too) when
triton was first imported. So TRITON_INTERPRET=1 must be set before triton is imported
(python_tests/conftest.py does it on a machine without a GPU). In a process that interprets,
the kernels run CPU tensors; in one that compiles, CUDA tensors. :func:`interpreting`
checks that a kernel module and triton agree, and :func:`check_device` that the tensor can
run in this process's mode, each with an error that says how to fix it.

The device a launch runs on is selected by the op around the call
(``sparsekern._backend.cuda_device``); nothing here touches a driver at import.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from sparsekern.errors import BackendUnavailableError

# The interpreter runs programs one after another; a small "machine" there keeps the grid tiny
# and still exercises the split path on test-sized inputs.
INTERPRETER_PROGRAMS = 4
# Grid axis 1 (the position splits) is limited to 65535 programs.
MAX_SPLITS = 65535


def triton_interprets() -> bool:
    """Whether this process runs Triton interpreted: how triton's own library was decorated."""
    return not isinstance(tl.max, triton.runtime.JITFunction)


def interpreting(op: str, kernel) -> bool:
    """This process's mode, after checking that ``kernel`` (a ``@triton.jit`` function of
    ``op``'s module) was decorated in the same mode as triton's library."""
    triton_mode = triton_interprets()
    if triton_mode != (not isinstance(kernel, triton.runtime.JITFunction)):
        raise BackendUnavailableError(
            f"{op}: TRITON_INTERPRET changed between importing triton and importing sparsekern's Triton "
            f"kernels (triton {'does' if triton_mode else 'does not'} interpret, the kernels do the opposite); "
            "set it before triton is first imported"
        )
    return triton_mode


def check_device(op: str, x: torch.Tensor, interpret: bool) -> None:
    """A CPU tensor runs only under the interpreter (a CUDA one runs in either mode)."""
    if x.device.type != "cuda" and not interpret:
        raise BackendUnavailableError(
            f"{op}: the triton backend runs CPU tensors only under the Triton interpreter, but triton was "
            "imported without TRITON_INTERPRET=1; set it before triton is first imported"
        )


@lru_cache(maxsize=None)
def _gpu_programs(device_index: int) -> int:
    """About how many programs fill the GPU: a few per SM (queried at the first launch, never at import)."""
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(x: torch.Tensor, interpret: bool) -> int:
    """How many programs a launch on ``x`` should reach, splitting positions if it must."""
    return INTERPRETER_PROGRAMS if interpret else _gpu_programs(x.device.index or 0)


def pow2(v: int) -> int:
    """The power of two at or above v (at least 1): Triton block sizes must be powers of two."""
    return triton.next_power_of_2(max(1, v))


def plan_splits(programs: int, chunks: int, target: int) -> tuple[int, int]:
    """(splits, chunks per split): split each program's ``chunks`` of positions over a second
    grid axis so that programs * splits reaches about ``target`` (every split but the last
    holds ``chunks per split`` chunks; each writes a partial result the launcher combines)."""
    if programs >= target or chunks < 2:
        return 1, max(chunks, 1)
    wanted = min(triton.cdiv(target, programs), MAX_SPLITS)
    # At least two chunks per split once there are four: a split of one chunk costs a partial
    # row to write and merge for one tile of reading.
    per_split = max(triton.cdiv(chunks, wanted), 2 if chunks >= 4 else 1)
    return triton.cdiv(chunks, per_split), per_split


def partial_buffer(out: torch.Tensor | None, splits: int) -> torch.Tensor | None:
    """Where the kernel writes: ``out`` itself with one split, else a (splits, *out.shape) buffer."""
    if out is None or splits == 1:
        return out
    return torch.empty((splits, *out.shape), dtype=out.dtype, device=out.device)
