"""channel_extrema: max |x|, signed min and signed max per (n, c) from one kernel pass, on every
backend forced explicitly, against an independent float64 reference (amin / amax over the
positions, NaN where any NaN, +inf / -inf over no positions).

Kinds are _helpers.KERNEL_KINDS; the C++ CPU kernel runs once per instruction-set variant this
CPU supports (baseline, avx2, avx512). Min and max are exact once upcast, so values are compared
exactly; -0.0 and +0.0 compare equal (the contract leaves the sign of a zero min / max open).
"""
from __future__ import annotations

import math

import pytest
import torch
from _helpers import KERNEL_KINDS, kind_params, prepare_kind

from sparsekern import BackendUnavailableError, _backend
from sparsekern.ops.channel_absmax import ChannelExtrema, channel_absmax, channel_extrema, channel_extrema_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_MAX_ELEMENTS = 20_000


def reference(x: torch.Tensor):
    """float64 (absmax, min, max, positive counts) of x over all dims after dim 1."""
    n, c = x.shape[0], x.shape[1]
    flat = x.detach().cpu().double().reshape(n, c, math.prod(x.shape[2:]))
    if flat.shape[2] == 0:
        inf = torch.full((n, c), math.inf, dtype=torch.float64)
        return torch.zeros(n, c, dtype=torch.float64), inf, -inf, torch.zeros(n, c, dtype=torch.int64)
    nan = torch.isnan(flat).any(dim=2)
    fill = lambda t: torch.where(nan, torch.full_like(t, math.nan), t)  # noqa: E731
    finite = torch.nan_to_num(flat, nan=0.0, posinf=math.inf, neginf=-math.inf)
    lo = torch.where(torch.isnan(flat), math.inf, flat).amin(dim=2)
    hi = torch.where(torch.isnan(flat), -math.inf, flat).amax(dim=2)
    return fill(finite.abs().amax(dim=2)), fill(lo), fill(hi), (flat > 0).sum(dim=2)


def assert_exact(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.cpu().double()
    assert got.shape == want.shape, what
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN at {torch.isnan(got).nonzero().tolist()}"
    diff = (got != want) & ~torch.isnan(want)
    assert not diff.any(), (f"{what}: {int(diff.sum())} values differ, first at {diff.nonzero()[0].tolist()}: "
                            f"got {got[diff][0].item()!r}, expected {want[diff][0].item()!r}")


def check(x: torch.Tensor, backend: str) -> None:
    before = x.clone()
    r = channel_extrema(x, count_positive=True, backend=backend)
    assert isinstance(r, ChannelExtrema)
    want = reference(x)
    n, c = x.shape[0], x.shape[1]
    for t in (r.absmax, r.minimum, r.maximum):
        assert t.dtype == torch.float32 and t.shape == (n, c) and t.device == x.device
    assert r.positive.dtype == torch.int64
    for got, ref, what in zip(r[:3], want[:3], ("absmax", "min", "max")):
        assert_exact(got, ref, what)
    assert torch.equal(r.positive.cpu(), want[3])
    plain = channel_extrema(x, backend=backend)
    assert plain.positive is None
    for got, ref, what in zip(plain[:3], want[:3], ("absmax", "min", "max")):
        assert_exact(got, ref, what)
    assert_exact(channel_absmax(x, backend=backend), want[0], "channel_absmax")  # the op without a range
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num()), \
        "the input was modified"


def sample(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Random values with exact zeros, negative zeros, all-negative and all-positive channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    u = torch.rand(shape, generator=g)
    x[u < 0.15] = 0.0
    x[(u >= 0.15) & (u < 0.2)] = -0.0
    if x.dim() >= 2 and x.shape[1] >= 3:
        x[:, 1] = -x[:, 1].abs() - 0.5  # no positive value: the max is negative
        x[:, 2] = x[:, 2].abs() + 0.5  # no negative value: the min is positive
    return x.to(dtype)


def _kinds():
    """Every kernel kind; the cpp kind once per instruction-set variant this machine can run."""
    ext = _backend.extension()
    isas = ext.cpu_isas_supported() if ext is not None else ["none"]
    params = []
    for kind in KERNEL_KINDS:
        for isa in (isas if kind == "cpp" else [None]):
            params.append(pytest.param(kind, isa, marks=KERNEL_KINDS[kind][2], id=kind if isa is None else f"cpp-{isa}"))
    return params


@pytest.fixture
def run_on(request):
    """Prepare a (kind, isa) case: skip what cannot run, switch the CPU variant (restored after)."""
    ext = _backend.extension()
    before = ext.cpu_isa() if ext is not None else None

    def prepare(kind, isa):
        backend, device = prepare_kind(kind)
        if isa is not None:
            ext.set_cpu_isa(isa)
        return backend, device

    yield prepare
    if ext is not None:
        ext.set_cpu_isa(before)


SHAPES = ((2, 1, 1, 1), (2, 7, 7, 7), (2, 97, 5, 3), (1, 3, 40, 40), (1, 2, 64, 64), (3, 33, 1, 17))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind, isa", _kinds())
def test_matches_reference(run_on, kind, isa, shape, dtype, layout):
    backend, device = run_on(kind, isa)
    x = sample(shape, dtype).to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    check(x, backend)


VIEWS = {
    "2d": lambda: sample((5, 97)),
    "2d-transposed": lambda: sample((13, 6)).t(),
    "3d": lambda: sample((3, 7, 100)),
    "5d-channels_last_3d": lambda: sample((2, 5, 3, 4, 6)).to(memory_format=torch.channels_last_3d),
    "5d-permuted-middle": lambda: sample((2, 3, 4, 5, 6)).permute(0, 1, 3, 2, 4),
    "slice-channels": lambda: sample((2, 14, 9, 9))[:, ::2],
    "slice-spatial-step": lambda: sample((2, 6, 9, 10))[..., ::2],
    "permuted-rows-apart": lambda: sample((2, 5, 6, 7)).permute(0, 2, 1, 3),
    "expanded-channels": lambda: sample((3, 1, 4, 4)).expand(3, 5, 4, 4),
    "long-1d": lambda: sample((1, 1, 9000)),
    "long-channels_last-aligned": lambda: sample((1, 8, 48, 48)).to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("kind, isa", _kinds())
def test_views(run_on, kind, isa, view):
    backend, device = run_on(kind, isa)
    x = VIEWS[view]().to(device)
    assert x.numel() <= INTERPRETER_MAX_ELEMENTS
    check(x, backend)


NAN_CASES = {
    "small": ((2, 5, 7, 7), False, [(1, 3, 2, 4)]),
    "small-channels_last": ((2, 5, 7, 7), True, [(1, 3, 2, 4)]),
    "first-and-last": ((2, 5, 7, 7), False, [(0, 0, 0, 0), (1, 4, 6, 6)]),
    "long-rows": ((1, 2, 64, 64), False, [(0, 1, 63, 63), (0, 0, 0, 0)]),  # split paths merge the NaN
    "long-channels_last": ((1, 3, 40, 40), True, [(0, 2, 39, 39), (0, 0, 20, 0)]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(NAN_CASES))
@pytest.mark.parametrize("kind, isa", _kinds())
def test_nan_is_nan_in_min_and_max(run_on, kind, isa, case, dtype):
    backend, device = run_on(kind, isa)
    shape, channels_last, where = NAN_CASES[case]
    x = sample(shape, dtype)
    for idx in where:
        x[idx] = float("nan")
    x = x.to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    r = channel_extrema(x, backend=backend)
    expected = torch.zeros(shape[:2], dtype=torch.bool)
    for idx in where:
        expected[idx[:2]] = True
    for t in r[:3]:
        assert torch.equal(torch.isnan(t.cpu()), expected)
    check(x, backend)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind, isa", _kinds())
def test_inf_and_signed_zero(run_on, kind, isa, layout):
    backend, device = run_on(kind, isa)
    x = sample((2, 5, 6, 6))
    x[0, 0, 2, 3] = float("inf")
    x[1, 1, 5, 0] = float("-inf")
    x[0, 3] = -0.0  # a channel of negative zeros
    x[1, 3] = 0.0
    x[1, 3, ::2] = -0.0  # mixed zeros: min == max == 0, whatever the sign
    x = x.to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    r = channel_extrema(x, backend=backend)
    lo, hi = r.minimum.cpu(), r.maximum.cpu()
    assert hi[0, 0] == math.inf and lo[1, 1] == -math.inf
    for n in (0, 1):
        assert lo[n, 3] == 0 and hi[n, 3] == 0 and hi[n, 3] - lo[n, 3] == 0
        assert r.absmax.cpu()[n, 3] == 0 and not torch.signbit(r.absmax.cpu()[n, 3])
    check(x, backend)


@pytest.mark.parametrize("kind, isa", _kinds())
def test_subnormal_and_extreme_values(run_on, kind, isa):
    backend, device = run_on(kind, isa)
    for dtype, scale in ((torch.float32, 1e-40), (torch.float16, 1e-6), (torch.bfloat16, 1e-39)):
        tiny = (sample((2, 8, 5, 5)) * scale).to(dtype)
        assert (tiny != 0).any() and tiny.abs().float().amax() < torch.finfo(dtype).tiny
        check(tiny.to(device), backend)
        big = sample((2, 3, 4, 4), dtype)
        big[0, 0, 1, 1], big[1, 2, 3, 3] = torch.finfo(dtype).max, -torch.finfo(dtype).max
        check(big.to(device), backend)


@pytest.mark.parametrize("shape", [(0, 5, 3, 3), (2, 0, 3, 3), (2, 3, 0, 4), (3, 2, 0)])
@pytest.mark.parametrize("kind, isa", _kinds())
def test_no_positions_gives_the_identities(run_on, kind, isa, shape):
    backend, device = run_on(kind, isa)
    r = channel_extrema(torch.empty(shape, device=device), count_positive=True, backend=backend)
    nc = shape[:2]
    assert torch.equal(r.absmax.cpu(), torch.zeros(nc))
    assert torch.equal(r.minimum.cpu(), torch.full(nc, math.inf))
    assert torch.equal(r.maximum.cpu(), torch.full(nc, -math.inf))
    assert torch.equal(r.positive.cpu(), torch.zeros(nc, dtype=torch.int64))


def test_reference_is_the_torch_backend():
    x = sample((3, 6, 5, 5))
    want = reference(x)
    for got, ref, what in zip(channel_extrema_reference(x, True)[:3], want[:3], ("absmax", "min", "max")):
        assert_exact(got, ref, what)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch", "cpp"])
def test_bad_input_is_a_clear_error(backend):
    with pytest.raises(TypeError, match="channel_extrema: unsupported dtype torch.int64"):
        channel_extrema(torch.zeros(2, 3, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match=r"channel_extrema: .*rank >= 2, got shape \(5,\)"):
        channel_extrema(torch.ones(5), backend=backend)
    with pytest.raises(TypeError, match="channel_extrema: count_positive must be a bool"):
        channel_extrema(torch.ones(2, 3), count_positive="yes", backend=backend)


def test_unavailable_backend_is_named():
    with pytest.raises(BackendUnavailableError, match="channel_extrema: backend 'cuda' is unavailable"):
        channel_extrema(torch.ones(2, 3), backend="cuda")


def test_extension_needs_both_range_outputs():
    ext = _backend.extension()
    if ext is None:
        pytest.skip("sparsekern._C is not built")
    x, out = torch.ones(2, 3), torch.empty(2, 3)
    with pytest.raises(ValueError, match="give both lo and hi"):
        ext.channel_absmax_cpu(x.data_ptr(), 0, 2, 3, 1, 1, 3, 1, 1, 1, out.data_ptr(), 0, out.data_ptr(), 0)
