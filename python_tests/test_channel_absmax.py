"""channel_absmax: every backend, forced explicitly, against an independent float64 reference.

Backends under test ("kinds"):
  torch             the pure-torch reference op (CPU)
  cpp               the C++ CPU kernel (skipped if sparsekern._C is not built)
  triton-interpret  the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (small shapes)
  cuda, triton-cuda the CUDA C++ and Triton kernels on a GPU (skipped without one)

The kinds are _helpers.KERNEL_KINDS (shared with test_bn_relu.py); where the triton-interpret
cases run (in this process without a GPU, in a GPU-less subprocess with one) is conftest.py's.

The max of |x| is exact in any precision once upcast, so results are compared exactly (no
tolerance): NaN exactly where the reference has NaN, every other value bit-equal to the
float64 reference, positive counts equal.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from _helpers import KERNEL_KINDS, kind_params, prepare_kind

import sparsekern
from sparsekern import BackendUnavailableError, channel_absmax
from sparsekern.ops.channel_absmax import channel_extrema, channel_extrema_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_CUDA = torch.cuda.is_available()
# The interpreter simulates programs one by one: keep its inputs small.
INTERPRETER_MAX_ELEMENTS = 20_000

# ---------------------------------------------------------------------------------------------
# Reference and comparison


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 max |x| over all dims after dim 1 (NaN where any NaN, 0 over no positions),
    and the int64 count of elements > 0."""
    n, c = x.shape[0], x.shape[1]
    flat = x.detach().cpu().double().reshape(n, c, math.prod(x.shape[2:]))
    if flat.shape[2] == 0:
        return torch.zeros(n, c, dtype=torch.float64), torch.zeros(n, c, dtype=torch.int64)
    m = flat.abs().amax(dim=2)
    m = torch.where(torch.isnan(flat).any(dim=2), torch.full_like(m, float("nan")), m)
    return m, (flat > 0).sum(dim=2)


def assert_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.cpu().double()
    assert got.shape == want.shape
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), f"NaN at {nan_got.nonzero().tolist()}, expected at {nan_want.nonzero().tolist()}"
    diff = (got != want) & ~nan_want
    assert not diff.any(), (
        f"{int(diff.sum())} of {diff.numel()} values differ, first at {diff.nonzero()[0].tolist()}: "
        f"got {got[diff][0].item()!r}, expected {want[diff][0].item()!r}"
    )


def check(x: torch.Tensor, backend: str) -> None:
    """Run the op both ways (with and without counts) and compare with the reference."""
    before = x.clone()
    m, pos = channel_absmax(x, count_positive=True, backend=backend)
    want_m, want_pos = reference(x)
    n, c = x.shape[0], x.shape[1]
    assert m.dtype == torch.float32 and m.shape == (n, c) and m.device == x.device
    assert pos.dtype == torch.int64 and pos.shape == (n, c) and pos.device == x.device
    assert_exact(m, want_m)
    assert torch.equal(pos.cpu(), want_pos)
    only_m = channel_absmax(x, backend=backend)
    assert isinstance(only_m, torch.Tensor)
    assert_exact(only_m, want_m)
    assert torch.equal(x, before), "the input was modified"


def sample(shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    """Random activations with exact zeros, negative zeros and negatives (so |x| and > 0 differ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    u = torch.rand(shape, generator=g)
    x[u < 0.2] = 0.0
    x[(u >= 0.2) & (u < 0.25)] = -0.0
    return x.to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# Shapes x dtypes x {contiguous, channels_last}

CHANNELS = (1, 7, 97, 1023)
SPATIAL = ((1, 1), (7, 7), (14, 14))


def matrix_params():
    params = []
    for kind in KERNEL_KINDS:
        for c in CHANNELS:
            for h, w in SPATIAL:
                n = 2
                if kind == "triton-interpret":
                    n = 1
                    if c * h * w > INTERPRETER_MAX_ELEMENTS:
                        continue
                for dtype in DTYPES:
                    for layout in ("contiguous", "channels_last"):
                        params.append(
                            pytest.param(
                                kind, (n, c, h, w), dtype, layout, marks=KERNEL_KINDS[kind][2],
                                id=f"{kind}-{n}x{c}x{h}x{w}-{str(dtype)[6:]}-{layout}",
                            )
                        )
    return params


@pytest.mark.parametrize("kind, shape, dtype, layout", matrix_params())
def test_matches_reference(kind, shape, dtype, layout):
    backend, device = prepare_kind(kind)
    x = sample(shape, dtype, device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    check(x, backend)


# ---------------------------------------------------------------------------------------------
# Other ranks and strided views (each built on the target device)

VIEWS = {
    "2d": lambda d, dt: sample((5, 97), dt, d),
    "2d-transposed": lambda d, dt: sample((13, 6), dt, d).t(),
    "3d": lambda d, dt: sample((3, 7, 100), dt, d),
    "3d-transposed": lambda d, dt: sample((2, 40, 17), dt, d).transpose(1, 2),
    "5d": lambda d, dt: sample((2, 3, 4, 5, 6), dt, d),
    "5d-channels_last_3d": lambda d, dt: sample((2, 5, 3, 4, 6), dt, d).to(memory_format=torch.channels_last_3d),
    "5d-permuted-middle": lambda d, dt: sample((2, 3, 4, 5, 6), dt, d).permute(0, 1, 3, 2, 4),
    "slice-channels": lambda d, dt: sample((2, 14, 9, 9), dt, d)[:, ::2],
    "slice-spatial": lambda d, dt: sample((2, 6, 9, 9), dt, d)[:, :, 1:8, 2:9],
    "slice-spatial-step": lambda d, dt: sample((2, 6, 9, 10), dt, d)[..., ::2],  # no unit stride at all
    "slice-channels_last": lambda d, dt: sample((2, 6, 9, 9), dt, d).to(memory_format=torch.channels_last)[:, 1:5, :, ::2],
    "permuted-channels-inner": lambda d, dt: sample((2, 9, 5, 11), dt, d).permute(0, 3, 1, 2),
    "permuted-rows-apart": lambda d, dt: sample((2, 5, 6, 7), dt, d).permute(0, 2, 1, 3),
    "expanded-batch-spatial": lambda d, dt: sample((1, 6, 1, 1), dt, d).expand(3, 6, 5, 5),
    "expanded-channels": lambda d, dt: sample((3, 1, 4, 4), dt, d).expand(3, 5, 4, 4),
    "offset-storage": lambda d, dt: sample((3, 4, 7, 7), dt, d)[1:],
    # few (n, c) and many positions: the kernels split positions across programs and merge
    "long-rows": lambda d, dt: sample((1, 2, 64, 64), dt, d),
    "long-channels_last": lambda d, dt: sample((1, 3, 40, 40), dt, d).to(memory_format=torch.channels_last),
    "long-channels_last-aligned": lambda d, dt: sample((1, 8, 48, 48), dt, d).to(memory_format=torch.channels_last),
    "long-strided": lambda d, dt: sample((1, 2, 64, 128), dt, d)[..., ::2],
    "long-1d": lambda d, dt: sample((1, 1, 9000), dt, d),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("kind", kind_params())
def test_views_and_ranks(kind, view, dtype):
    backend, device = prepare_kind(kind)
    x = VIEWS[view](device, dtype)
    assert x.numel() <= INTERPRETER_MAX_ELEMENTS  # every view here is also interpreter-sized
    check(x, backend)


@pytest.mark.parametrize("shape", [(0, 5, 3, 3), (2, 0, 3, 3), (2, 3, 0, 4), (2, 3, 4, 0), (0, 4), (3, 2, 0)])
@pytest.mark.parametrize("kind", kind_params())
def test_empty(kind, shape):
    backend, device = prepare_kind(kind)
    x = torch.empty(shape, device=device)
    m, pos = channel_absmax(x, count_positive=True, backend=backend)
    assert m.shape == shape[:2] and m.dtype == torch.float32
    assert pos.shape == shape[:2] and pos.dtype == torch.int64
    # No positions: the max over nothing is 0 and nothing is positive.
    assert torch.equal(m.cpu(), torch.zeros(shape[:2]))
    assert torch.equal(pos.cpu(), torch.zeros(shape[:2], dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Non-finite values and extreme magnitudes

NAN_CASES = {
    # name: (shape, channels_last, NaN positions)
    "small": ((2, 5, 7, 7), False, [(1, 3, 2, 4)]),
    "small-channels_last": ((2, 5, 7, 7), True, [(1, 3, 2, 4)]),
    "first-and-last": ((2, 5, 7, 7), False, [(0, 0, 0, 0), (1, 4, 6, 6)]),
    # in a split case the NaN must survive the merge of partial results, wherever it falls
    "long-rows": ((1, 2, 64, 64), False, [(0, 1, 63, 63), (0, 0, 0, 0)]),
    "long-channels_last": ((1, 3, 40, 40), True, [(0, 2, 39, 39), (0, 0, 20, 0)]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(NAN_CASES))
@pytest.mark.parametrize("kind", kind_params())
def test_nan_marks_exactly_its_channel(kind, case, dtype):
    backend, device = prepare_kind(kind)
    shape, channels_last, where = NAN_CASES[case]
    x = sample(shape, dtype)
    for idx in where:
        x[idx] = float("nan")
    x = x.to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    m, pos = channel_absmax(x, count_positive=True, backend=backend)
    expected_nan = torch.zeros(shape[:2], dtype=torch.bool)
    for idx in where:
        expected_nan[idx[:2]] = True
    assert torch.equal(torch.isnan(m.cpu()), expected_nan)
    assert_exact(m, reference(x)[0])
    assert torch.equal(pos.cpu(), reference(x)[1])  # NaN is not > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", kind_params())
def test_inf(kind, layout, dtype):
    backend, device = prepare_kind(kind)
    x = sample((2, 4, 6, 6), dtype)
    x[0, 1, 2, 3] = float("inf")
    x[1, 2, 5, 0] = float("-inf")
    x[1, 3, 0, 0], x[1, 3, 0, 1] = float("inf"), float("-inf")
    x = x.to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    m, pos = channel_absmax(x, count_positive=True, backend=backend)
    m = m.cpu()
    for n, c in [(0, 1), (1, 2), (1, 3)]:
        assert m[n, c] == float("inf")
    assert torch.isfinite(m).sum() == m.numel() - 3
    assert_exact(m, reference(x)[0])
    assert torch.equal(pos.cpu(), reference(x)[1])  # +inf counts as positive, -inf does not


# Subnormal maxima (fp32/bf16 below 1.2e-38, fp16 below 6.1e-5) must come back exactly:
# catches a kernel that flushes denormals to zero or rounds through a narrower type.
TINY_SCALE = {torch.float32: 1e-40, torch.float16: 1e-6, torch.bfloat16: 1e-39}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", kind_params())
def test_subnormal_values_are_exact(kind, layout, dtype):
    backend, device = prepare_kind(kind)
    x = (sample((2, 8, 5, 5), torch.float32) * TINY_SCALE[dtype]).to(dtype)
    assert (x != 0).any() and (x.abs().float().amax() < torch.finfo(dtype).tiny)
    x = x.to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    check(x, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", kind_params())
def test_extreme_finite_values(kind, dtype):
    backend, device = prepare_kind(kind)
    big = torch.finfo(dtype).max
    x = sample((2, 3, 4, 4), dtype)
    x[0, 0, 1, 1] = big
    x[1, 2, 3, 3] = -big
    check(x.to(device), backend)


# ---------------------------------------------------------------------------------------------
# Bad input and backend selection


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float64],
    ids=lambda d: str(d)[6:],
)
@pytest.mark.parametrize("backend", ["auto", "torch", "cpp", "triton", "cuda"])
def test_unsupported_dtype_names_it(backend, dtype):
    x = torch.zeros(2, 3, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        channel_absmax(x, backend=backend)


@pytest.mark.parametrize("x", [torch.tensor(1.0), torch.ones(5)], ids=["rank0", "rank1"])
@pytest.mark.parametrize("backend", ["auto", "torch", "cpp", "triton", "cuda"])
def test_low_rank_names_the_shape(backend, x):
    with pytest.raises(ValueError, match=re.escape(f"rank >= 2, got shape {tuple(x.shape)}")):
        channel_absmax(x, backend=backend)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        channel_absmax([[1.0, 2.0]])


def test_cuda_backend_on_cpu_tensor_is_unavailable():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        channel_absmax(torch.ones(2, 3), backend="cuda")


def test_triton_on_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        channel_absmax(torch.ones(2, 3), backend="triton")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        channel_absmax(torch.ones(2, 3), backend="tpu")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cpp_backend_on_cuda_tensor_is_unavailable():
    with pytest.raises(BackendUnavailableError, match="cpp"):
        channel_absmax(torch.ones(2, 3, device="cuda"), backend="cpp")


def test_auto_on_cpu_matches_reference():
    x = sample((3, 5, 6, 6))
    assert_exact(channel_absmax(x), reference(x)[0])
    assert_exact(sparsekern.channel_absmax_reference(x), reference(x)[0])


@pytest.mark.parametrize("call", [
    "sparsekern.channel_absmax(torch.ones(2, 3, 4), backend='triton')",
    "sparsekern.bn_relu(torch.ones(2, 3, 4), torch.ones(3), torch.zeros(3), backend='triton')",
], ids=["channel_absmax", "bn_relu"])
def test_triton_imported_before_interpreter_switch_is_a_clear_error(call):
    """TRITON_INTERPRET set after triton was imported: a BackendUnavailableError, not a crash
    deep inside the interpreter, for either op (one check, sparsekern/triton/_utils.py). Needs a
    fresh process (the import state is per process)."""
    pytest.importorskip("triton")
    script = (
        "import os, torch, triton, sparsekern\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        f"    {call}\n"
        "except sparsekern.BackendUnavailableError as exc:\n"
        "    print('unavailable:', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "unavailable:" in run.stdout and "before triton is first imported" in run.stdout, run.stdout


# ---------------------------------------------------------------------------------------------
# The C++ kernel's vector tiers: rows of 8..31 elements (one 8-lane step, then scalar), channels_last
# slices of 16 and 8 channels in registers plus a scalar channel tail, position tiles of 64 (odd
# counts: the one-position step), with NaN in a vector lane and in a tail element.

CPU_TIER_CASES = {
    # name: (shape, channels_last)
    "rows-9": ((3, 5, 3, 3), False),
    "rows-36": ((2, 6, 6, 6), False),
    "rows-49": ((2, 3, 7, 7), False),
    "cl-channels-41-positions-9": ((3, 41, 3, 3), True),
    "cl-channels-24-positions-130": ((2, 24, 10, 13), True),
    "cl-channels-300-positions-65": ((2, 300, 5, 13), True),  # two channel blocks, a 1-position last tile
    "cl-split-positions": ((1, 16, 40, 41), True),  # one (n, block) pair: positions split across tasks
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(CPU_TIER_CASES))
def test_cpu_vector_tiers_match_reference(case, dtype):
    prepare_kind("cpp")
    shape, channels_last = CPU_TIER_CASES[case]
    x = sample(shape, dtype)
    flat = x.view(shape[0], shape[1], -1)
    flat[0, 0, 0] = float("nan")  # a vector lane (or the only element of a short row)
    flat[-1, -1, -1] = float("nan")  # the scalar tail / the last tile
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got = channel_extrema(x, count_positive=True, backend="cpp")
    want = channel_extrema_reference(x, count_positive=True)
    for name in ("absmax", "minimum", "maximum"):
        g, w = getattr(got, name), getattr(want, name)
        assert torch.equal(torch.isnan(g), torch.isnan(w)), name
        finite = ~torch.isnan(w)
        # min/max instructions may give -0.0 for +0.0: compare values, not bits
        assert torch.equal(g[finite], w[finite]), name
    assert torch.equal(got.positive, want.positive)
