"""sparsekern.bn_relu, FusedBNReLU and fuse_bn_relu against an independent float64 reference.

Every backend is forced explicitly (the kinds of _helpers.KERNEL_KINDS): cpp and torch on CPU
tensors, triton under the Triton interpreter on CPU tensors (small shapes; where they run is
conftest.py's), cuda and triton on CUDA tensors (skipped without a GPU). The reference is
eval-mode BatchNorm + ReLU written out in float64 from the BN's own parameters, so it also
checks bn_affine.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import kind_params, prepare_kind, randomize_bn
from torch import nn

import sparsekern
from sparsekern import BackendUnavailableError
from sparsekern.ops.bn_relu import FusedBNReLU, bn_affine, bn_relu, bn_relu_reference, fuse_bn_relu

ALL_BACKENDS = kind_params()
COMPILED_BACKENDS = kind_params(["cpp", "torch", "cuda", "triton-cuda"])  # the full matrix
TRITON_INTERPRET = kind_params(["triton-interpret"])  # a smaller matrix (see INTERPRET_MATRIX)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture
def backend_on(request):
    """(backend, device) for the test's kind (an indirect param), skipping what cannot run here."""
    return prepare_kind(request.param)


def _bn_params(c: int, seed: int):
    """Random eval-mode BN statistics and affine, float32, with about half the outputs below 0."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(c, generator=g) * 0.5
    var = torch.rand(c, generator=g) * 2 + 0.1
    gamma = torch.randn(c, generator=g)
    beta = torch.randn(c, generator=g) * 0.5
    return mean, var, gamma, beta


def _make_bn(c: int, seed: int, dims: int = 2) -> nn.Module:
    bn = nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)
    mean, var, gamma, beta = _bn_params(c, seed)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
    return bn.eval()


def truth64(x: torch.Tensor, bn: nn.Module, dead: torch.Tensor | None = None) -> torch.Tensor:
    """Eval-mode BN + ReLU in float64 straight from the BN's parameters (NaN-preserving)."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mean, var, gamma, beta = (
        getattr(bn, k).detach().double().cpu().reshape(shape) for k in ("running_mean", "running_var", "weight", "bias")
    )
    z = (x.detach().double().cpu() - mean) / torch.sqrt(var + bn.eps) * gamma + beta
    y = torch.where(z < 0, torch.zeros_like(z), z)  # relu that keeps NaN
    if dead is not None:
        y = torch.where(dead.cpu().reshape(shape), torch.zeros_like(y), y)
    return y


def affine64(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dead=None) -> torch.Tensor:
    """relu(x * scale + shift) in float64 from the given per-channel parameters."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    z = x.detach().double().cpu() * scale.double().cpu().reshape(shape) + shift.double().cpu().reshape(shape)
    y = torch.where(z < 0, torch.zeros_like(z), z)
    if dead is not None:
        y = torch.where(dead.cpu().reshape(shape), torch.zeros_like(y), y)
    return y


def make_input(shape, dtype, layout, device, seed=0):
    """x of `shape` in `layout`: contiguous, channels_last (4-D), a strided (non-dense) view, or
    contiguous_T / channels_last_T (4-D, H and W transposed)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        # every other channel of a wider tensor, and a last dim cut short when there is one
        big = list(shape)
        big[1] = 2 * shape[1]
        if len(shape) > 2:
            big[-1] = shape[-1] + 3
        base = (torch.randn(big, generator=g) * 2).to(dtype).to(device)
        x = base[:, ::2]
        if len(shape) > 2:
            x = x[..., : shape[-1]]
        assert tuple(x.shape) == tuple(shape) and not x.is_contiguous()
        return x
    if layout.endswith("_T"):
        # the last two dims swapped: dense, but the positions no longer fold into one run
        x = make_input(shape[:-2] + (shape[-1], shape[-2]), dtype, layout[:-2], device, seed)
        return x.transpose(-1, -2)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def check_layout(x: torch.Tensor, y: torch.Tensor) -> None:
    """y keeps x's strides for dense x (as torch.empty_like) and is contiguous otherwise."""
    like = torch.empty_like(x)
    dense = all(a == b for a, b, s in zip(like.stride(), x.stride(), x.shape) if s > 1)
    expected = like if dense else torch.empty(x.shape)
    assert all(a == b for a, b, s in zip(y.stride(), expected.stride(), y.shape) if s > 1), (y.stride(), x.stride())


def check_against_truth(x, y, m, truth, scale, shift, dtype, torch_same_dtype=None):
    """fp32: within 1e-6 of the terms' magnitude; fp16/bf16: at most 2x torch's own same-dtype error."""
    assert y.dtype == x.dtype and y.shape == x.shape
    assert m.dtype == torch.float32 and m.shape == x.shape[:2]
    err = (y.double().cpu() - truth).abs()
    if dtype == torch.float32:
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        magnitude = (x.double().cpu() * scale.double().reshape(shape)).abs() + shift.double().abs().reshape(shape)
        assert bool((err <= 1e-6 * magnitude + 1e-30).all()), float((err / (magnitude + 1e-30)).max())
    else:
        torch_err = (torch_same_dtype.double().cpu() - truth).abs().max().item()
        assert err.max().item() <= 2 * torch_err + 1e-12, (err.max().item(), torch_err)
    # The max is the max of y as stored (exactly), and that of the truth within the same error.
    assert torch.equal(m.cpu(), y.reshape(y.shape[0], y.shape[1], -1).amax(dim=2).float().cpu())


# Shapes: channel counts 1, 7, 97, 1023 x spatial extents 1 (both (N, C) and (N, C, 1, 1)),
# 49 (as 7x7 and as a length-49 1-D map), 196 (14x14).
SPATIAL = [(), (1, 1), (49,), (7, 7), (14, 14)]
LAYOUTS = ["contiguous", "channels_last", "strided", "contiguous_T", "channels_last_T"]


def _matrix(channels, spatial, dtypes=DTYPES, layouts=LAYOUTS):
    cases = []
    for c in channels:
        for sp in spatial:
            for dtype in dtypes:
                for layout in layouts:
                    if layout.startswith(("channels_last", "contiguous_T")) and len(sp) != 2:
                        continue
                    if layout == "strided" and c == 1 and sp == ():
                        continue  # a (2, 1) slice of a (2, 2) tensor is just a column; covered by others
                    name = f"C{c}-S{'x'.join(map(str, sp)) or '0'}-{DTYPE_IDS[DTYPES.index(dtype)]}-{layout}"
                    cases.append(pytest.param(c, sp, dtype, layout, id=name))
    return cases


FULL_MATRIX = _matrix([1, 7, 97, 1023], SPATIAL)
# The interpreter simulates programs one by one: a smaller matrix still covering every
# layout, dtype and kernel path (rows / channel tiles, splits, non-flat positions).
INTERPRET_MATRIX = (
    _matrix([1, 7, 97], [(), (7, 7), (49,)])
    + _matrix([1023], [()], [torch.float32])  # several channel tiles and a ragged last one
    + _matrix([1], [(40, 40)], layouts=["contiguous", "channels_last"])  # positions split over programs
)


def _run_matrix_case(backend, device, c, sp, dtype, layout):
    bn = _make_bn(c, seed=c + len(sp))
    scale, shift = bn_affine(bn)
    x = make_input((2, c) + sp, dtype, layout, device, seed=c)
    y, m = bn_relu(x, scale.to(device), shift.to(device), return_max=True, backend=backend)
    check_layout(x, y)
    truth = truth64(x, bn)
    own = None
    if dtype != torch.float32:
        own = F.relu(F.batch_norm(x, *(t.to(device, dtype) for t in (bn.running_mean, bn.running_var)),
                                  bn.weight.detach().to(device, dtype), bn.bias.detach().to(device, dtype),
                                  training=False, eps=bn.eps))
    check_against_truth(x, y, m, truth, scale, shift, dtype, own)


@pytest.mark.parametrize("backend_on", COMPILED_BACKENDS, indirect=True)
@pytest.mark.parametrize("c, sp, dtype, layout", FULL_MATRIX)
def test_matches_float64_reference(backend_on, c, sp, dtype, layout):
    _run_matrix_case(*backend_on, c, sp, dtype, layout)


@pytest.mark.parametrize("backend_on", TRITON_INTERPRET, indirect=True)
@pytest.mark.parametrize("c, sp, dtype, layout", INTERPRET_MATRIX)
def test_triton_interpreter_matches_float64_reference(backend_on, c, sp, dtype, layout):
    _run_matrix_case(*backend_on, c, sp, dtype, layout)


@pytest.mark.parametrize("backend_on", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dead_channels_are_zero_and_never_read(backend_on, layout, dtype):
    backend, device = backend_on
    c = 21  # 8-channel groups that are all dead, all live and mixed
    dead = torch.zeros(c, dtype=torch.bool)
    dead[[0, 3, 8, 9, 10, 11, 12, 13, 14, 15, 20]] = True
    x = make_input((3, c, 5, 6), dtype, layout, device, seed=1)
    # If a dead channel were read, its NaN would reach y or the max.
    x[:, dead.to(device)] = float("nan")
    scale, shift = bn_affine(_make_bn(c, seed=2))
    shift = shift.abs() + 0.5  # dead channels would otherwise come out positive
    y, m = bn_relu(x, scale.to(device), shift.to(device), dead.to(device), return_max=True, backend=backend)
    y_dead = y[:, dead.to(device)]
    assert bool((y_dead == 0).all()), "dead channels must be exactly 0"
    assert bool((m[:, dead.to(device)] == 0).all())
    live = ~dead
    truth = affine64(x, scale, shift, dead)[:, live]
    err = (y.double().cpu()[:, live] - truth).abs()
    # one rounding to the dtype (half an ulp, relative) plus float32 arithmetic on the terms
    magnitude = affine64(x.abs(), scale.abs(), shift.abs())[:, live]
    assert bool((err <= torch.finfo(dtype).eps * truth + 1e-6 * magnitude).all())
    assert not bool(torch.isnan(y).any())
    assert torch.equal(m.cpu(), y.reshape(3, c, -1).amax(dim=2).float().cpu())
    # the same call without return_max gives the same y
    y2 = bn_relu(x, scale.to(device), shift.to(device), dead.to(device), backend=backend)
    assert torch.equal(y2, y)


@pytest.mark.parametrize("backend_on", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_and_inf(backend_on, layout, dtype):
    backend, device = backend_on
    c = 11
    x = make_input((2, c, 4, 5), dtype, layout, device, seed=3)
    scale = torch.linspace(0.5, 1.5, c)
    shift = torch.zeros(c)
    x[0, 2, 1, 3] = float("nan")
    x[1, 9, 0, 0] = float("nan")
    x[1, 4, 2, 2] = float("inf")  # scale > 0: y = inf
    x[0, 5, 3, 4] = -float("inf")  # y = 0
    y, m = bn_relu(x, scale.to(device), shift.to(device), return_max=True, backend=backend)
    assert bool(torch.isnan(y[0, 2, 1, 3])) and bool(torch.isnan(y[1, 9, 0, 0]))
    assert int(torch.isnan(y).sum()) == 2, "relu(NaN) is NaN, and only there"
    assert y[1, 4, 2, 2].item() == float("inf") and y[0, 5, 3, 4].item() == 0.0
    nan_m = torch.zeros(2, c, dtype=torch.bool)
    nan_m[0, 2] = nan_m[1, 9] = True
    assert torch.equal(torch.isnan(m).cpu(), nan_m), "exactly the (n, c) that saw a NaN report NaN"
    assert m[1, 4].item() == float("inf")
    truth = affine64(x, scale, shift)
    finite = ~nan_m
    assert torch.allclose(m.cpu()[finite].double(), truth.reshape(2, c, -1).amax(2)[finite], rtol=1e-2)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy, on inf
@pytest.mark.parametrize("backend_on", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_rounding_is_torchs_bit_for_bit(backend_on, layout, dtype):
    """With shift = 0 every backend computes round_dtype(round_fp32(x * s)) exactly as torch does."""
    backend, device = backend_on
    c = 24
    x = (torch.randn(2, c, 9, 9, generator=torch.Generator().manual_seed(12)) * 100).to(dtype)
    x.view(-1)[::37] = float("inf")  # times a large scale overflows the dtype: inf, as torch
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    scale = torch.randn(c, generator=torch.Generator().manual_seed(13)) * torch.logspace(-3, 3, c)
    shift = torch.zeros(c)
    y, m = bn_relu(x.to(device), scale.to(device), shift.to(device), return_max=True, backend=backend)
    expected = torch.relu(x.float() * scale.reshape(1, c, 1, 1)).to(dtype)
    assert torch.equal(y.cpu().view(torch.int16), expected.view(torch.int16))
    assert torch.equal(m.cpu(), expected.amax((2, 3)).float())


@pytest.mark.parametrize("backend_on", ALL_BACKENDS, indirect=True)
def test_rank5_and_empty_inputs(backend_on):
    backend, device = backend_on
    c = 6
    scale, shift = bn_affine(_make_bn(c, seed=4))
    # A permuted 5-D tensor cannot fold into (N, C, R, L): it is read once through a copy.
    x = torch.randn(2, 3, 4, c, 5).to(device).permute(0, 3, 1, 2, 4)
    y, m = bn_relu(x, scale.to(device), shift.to(device), return_max=True, backend=backend)
    truth = affine64(x, scale, shift)
    assert torch.allclose(y.double().cpu(), truth, rtol=1e-6, atol=1e-6)
    assert torch.equal(m.cpu(), y.reshape(2, c, -1).amax(2).cpu())
    # No samples, and no positions: an empty y; the max over no positions is 0.
    y0, m0 = bn_relu(torch.empty(0, c, 3, 3, device=device), scale.to(device), shift.to(device), return_max=True,
                     backend=backend)
    assert y0.shape == (0, c, 3, 3) and m0.shape == (0, c)
    y1, m1 = bn_relu(torch.empty(2, c, 0, device=device), scale.to(device), shift.to(device), return_max=True,
                     backend=backend)
    assert y1.shape == (2, c, 0) and torch.equal(m1.cpu(), torch.zeros(2, c))


def test_reference_is_the_fallback_definition():
    x = make_input((2, 5, 3, 3), torch.float32, "channels_last", "cpu")
    scale, shift = torch.randn(5), torch.randn(5)
    dead = torch.tensor([False, True, False, False, True])
    y, m = bn_relu_reference(x, scale, shift, dead, return_max=True)
    assert torch.allclose(y.double(), affine64(x, scale, shift, dead), rtol=1e-6, atol=1e-7)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(m, y.amax((2, 3)))


# ---------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 4, 3, 3)
    s, b = torch.ones(4), torch.zeros(4)
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        bn_relu(x.double(), s, b)
    with pytest.raises(TypeError, match="integer"):
        bn_relu(torch.ones(2, 4, dtype=torch.int32), s, b)
    with pytest.raises(ValueError, match="rank >= 2"):
        bn_relu(torch.randn(4), s, b)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        bn_relu(x, torch.ones(3), b)
    with pytest.raises(ValueError, match=r"shift must have shape \(4,\)"):
        bn_relu(x, s, torch.zeros(1, 4))
    with pytest.raises(TypeError, match="scale must be a floating-point tensor"):
        bn_relu(x, torch.ones(4, dtype=torch.int64), b)
    with pytest.raises(TypeError, match="shift must be a torch.Tensor"):
        bn_relu(x, s, [0.0] * 4)
    with pytest.raises(TypeError, match="dead_mask must be a bool tensor"):
        bn_relu(x, s, b, torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"dead_mask must have shape \(4,\)"):
        bn_relu(x, s, b, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale is on"):
        bn_relu(x.to("meta"), s, b)
    with pytest.raises(ValueError, match="unknown backend"):
        bn_relu(x, s, b, backend="fortran")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable"):
        bn_relu(x, s, b, backend="cuda")


def test_kernels_refuse_inputs_that_need_grad():
    x = torch.randn(2, 3, 4, requires_grad=True)
    s, b = torch.ones(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match="inference-only"):
        bn_relu(x, s, b, backend="cpp")
    with torch.no_grad():
        assert torch.equal(bn_relu(x, s, b, backend="cpp"), torch.relu(x))
    y = bn_relu(x, s, b, backend="torch")  # the reference is plain torch: differentiable
    y.sum().backward()
    assert torch.equal(x.grad, (x > 0).float())


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        bn_relu(torch.randn(2, 3), torch.ones(3), torch.zeros(3), backend="triton")


def test_scale_in_any_float_dtype_is_used_as_float32():
    x = torch.randn(2, 3, 4)
    s16, b16 = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float16), torch.tensor([0.25, -1.0, 0.0], dtype=torch.bfloat16)
    y = bn_relu(x, s16, b16, backend="cpp")
    assert torch.allclose(y.double(), affine64(x, s16.float(), b16.float()), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- bn_affine

def test_bn_affine_matches_hand_computation():
    bn = _make_bn(5, seed=5)
    bn.eps = 1e-3
    scale, shift = bn_affine(bn)
    assert scale.dtype == shift.dtype == torch.float32
    for c in range(5):
        g, bt = bn.weight[c].item(), bn.bias[c].item()
        mu, var = bn.running_mean[c].item(), bn.running_var[c].item()
        expected_scale = g / (var + 1e-3) ** 0.5
        assert scale[c].item() == pytest.approx(expected_scale, rel=1e-7)
        assert shift[c].item() == pytest.approx(bt - mu * expected_scale, rel=1e-6, abs=1e-7)
    plain = nn.BatchNorm1d(3, affine=False).eval()
    s, b = bn_affine(plain)  # gamma = 1, beta = 0; fresh stats mean 0, var 1
    assert torch.allclose(s, torch.full((3,), (1 + 1e-5) ** -0.5)) and torch.equal(b, torch.zeros(3))


def test_bn_affine_refuses_what_it_cannot_fold():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bn_affine(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(TypeError, match=r"bn_affine: expected a BatchNorm \(BatchNorm1d/2d/3d or SyncBatchNorm\), "
                                        "got LayerNorm"):
        bn_affine(nn.LayerNorm(3))
    with pytest.raises(ValueError, match="bn_affine: this LazyBatchNorm2d is not initialised yet"):
        bn_affine(nn.LazyBatchNorm2d())
    bn = _make_bn(3, seed=6)
    bn.running_var[1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        bn_affine(bn)


def test_fold_bn_is_the_deprecated_name_of_bn_affine():
    import sparsekern.ops.bn_relu as ops_bn_relu

    with pytest.warns(DeprecationWarning, match=r"sparsekern\.ops\.bn_relu\.fold_bn is deprecated.*"
                                                r"use sparsekern\.ops\.bn_relu\.bn_affine"):
        old = ops_bn_relu.fold_bn
    assert old is bn_affine
    with pytest.warns(DeprecationWarning, match="bn_affine"):
        from sparsekern.ops.bn_relu import fold_bn  # noqa: F401  (the import form warns too)
    assert sparsekern.bn_affine is bn_affine  # the new name is public at the top level, as bn_relu


def _copy_bn_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst, name).copy_(getattr(src, name))
    dst.eps = src.eps
    return dst.eval()


def test_sync_batch_norm_is_a_batch_norm_like_batchnorm2d():
    """A SyncBatchNorm (eval mode: its forward needs no process group) gives what the same
    BatchNorm2d gives: the same affine, the same fused output, and it is fused by fuse_bn_relu."""
    bn2d = _make_bn(6, seed=14)
    sync = _copy_bn_state(bn2d, nn.SyncBatchNorm(6))
    scale2d, shift2d = bn_affine(bn2d)
    scale, shift = bn_affine(sync)
    assert torch.equal(scale, scale2d) and torch.equal(shift, shift2d)
    x = torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        expected = F.relu(bn2d(x))
        assert torch.allclose(F.relu(sync(x)), expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(bn_relu(x, scale, shift), expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(FusedBNReLU.from_bn(sync)(x), expected, rtol=1e-5, atol=1e-6)
        fused = fuse_bn_relu(nn.Sequential(sync, nn.ReLU()).eval())
    assert isinstance(fused[0], FusedBNReLU) and isinstance(fused[1], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(fused(x), expected, rtol=1e-5, atol=1e-6)


def test_batchnorm3d_is_fused_on_5d_activations():
    bn3d = _copy_bn_state(_make_bn(4, seed=16), nn.BatchNorm3d(4))
    x = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        expected = F.relu(bn3d(x))
        fused = fuse_bn_relu(nn.Sequential(nn.Conv3d(4, 4, 1), bn3d, nn.ReLU()).eval())
        assert isinstance(fused[1], FusedBNReLU)
        assert torch.allclose(fused[1](x), expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(truth64(x, bn3d).float(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- module form

class SmallConvNet(nn.Module):
    """Two Conv-BN-ReLU blocks in Sequentials, plus pairs that must not be fused."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),  # BN -> conv: not a pair
            nn.Conv2d(16, 12, 1), nn.ReLU(),  # ReLU without a BN before it
        )
        self.side_bn = nn.BatchNorm2d(12)  # BN -> functional torch.relu outside a Sequential: a pair
        self.add_bn = nn.BatchNorm2d(12)  # BN -> residual add -> ReLU: not a pair
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12 * 4 * 4, 10), nn.BatchNorm1d(10), nn.ReLU())

    def forward(self, x):
        h = self.features(x)
        h = torch.relu(self.side_bn(h)) + h
        return self.head(F.relu(self.add_bn(h) + h))


def test_fuse_bn_relu_keeps_outputs_and_fuses_every_bn_relu_pair():
    torch.manual_seed(0)
    model = SmallConvNet()
    randomize_bn(model, seed=7)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    work = copy.deepcopy(model)
    fused = fuse_bn_relu(work)
    kinds = [type(m).__name__ for m in work.features]  # modified in place as well
    assert kinds == ["Conv2d", "FusedBNReLU", "Identity", "Conv2d", "FusedBNReLU", "Identity", "MaxPool2d",
                     "Conv2d", "BatchNorm2d", "Conv2d", "ReLU"]
    assert isinstance(fused, torch.fx.GraphModule)  # the functional torch.relu after side_bn is gone from its graph
    assert isinstance(fused.side_bn, FusedBNReLU) and isinstance(fused.add_bn, nn.BatchNorm2d)
    assert isinstance(work.head[2], FusedBNReLU) and isinstance(work.head[3], nn.Identity)
    relus = [n for n in fused.graph.nodes if n.target in (torch.relu, F.relu) or n.op == "call_module"
             and isinstance(fused.get_submodule(n.target), nn.ReLU)]
    assert len(relus) == 2  # the ReLU after the residual add, and the one after a conv without a BN
    with torch.no_grad():
        got = fused(x)
        in_place = work(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(in_place, got)


def test_fused_module_equals_bn_relu_in_a_conv_net_and_records_max():
    torch.manual_seed(1)
    conv1, bn1, conv2, bn2 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5)
    ref = nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2, nn.ReLU()).eval()
    randomize_bn(ref, seed=8)
    seen = []
    fused_bn2 = FusedBNReLU.from_bn(bn2, record_max=True, on_max=seen.append)
    net = nn.Sequential(conv1, FusedBNReLU.from_bn(bn1), conv2, fused_bn2).eval()
    x = torch.randn(3, 3, 9, 9)
    with torch.no_grad():
        expected = ref(x)
        got = net(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(seen) == 1 and seen[0] is fused_bn2.last_max
    assert torch.equal(fused_bn2.last_max, got.amax((2, 3)))
    # channels_last activations flow through unchanged in format
    with torch.no_grad():
        got_cl = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert got_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got_cl, expected, rtol=1e-5, atol=1e-6)


def test_fused_module_dead_mask_and_state_dict():
    bn = _make_bn(4, seed=9)
    dead = torch.tensor([False, True, False, True])
    mod = FusedBNReLU.from_bn(bn, dead_mask=dead)
    assert set(mod.state_dict()) == {"scale", "shift", "dead_mask"}
    x = torch.randn(2, 4, 3, 3)
    y = mod(x)
    assert bool((y[:, dead] == 0).all())
    assert torch.allclose(y[:, ~dead], F.relu(bn(x))[:, ~dead], rtol=1e-5, atol=1e-6)
    clone = FusedBNReLU(torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    clone.load_state_dict(mod.state_dict())
    assert torch.equal(clone(x), y)


def test_fused_module_refuses_training_mode():
    bn = _make_bn(3, seed=10)
    mod = FusedBNReLU.from_bn(bn)
    assert not mod.training
    mod.train()
    with pytest.raises(RuntimeError, match="eval mode only"):
        mod(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="training mode"):
        FusedBNReLU.from_bn(nn.BatchNorm2d(3))  # a fresh module is in training mode
    with pytest.raises(ValueError, match="training mode"):
        fuse_bn_relu(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()))
    with pytest.raises(ValueError, match="NaN or Inf"):
        FusedBNReLU(torch.tensor([1.0, float("inf")]), torch.zeros(2))


def test_fuse_leaves_bn_without_running_stats_alone():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU()).eval()
    fuse_bn_relu(model)
    assert isinstance(model[0], nn.BatchNorm2d) and isinstance(model[1], nn.ReLU)


def test_record_max_feeds_channel_stats():
    stats_mod = pytest.importorskip("sparsekern.stats.channel_stats")
    stats = stats_mod.ChannelStats()
    bn = _make_bn(6, seed=11)
    mod = FusedBNReLU.from_bn(bn, on_max=stats.update_reduced)
    batches = [torch.randn(5, 6, 4, 4) for _ in range(3)]
    for xb in batches:
        mod(xb)
    expected = torch.cat([F.relu(bn(xb)).amax((2, 3)) for xb in batches]).amax(0)
    assert torch.allclose(stats.corpus_max, expected, rtol=1e-6, atol=1e-7)


def test_lazy_top_level_names():
    assert sparsekern.bn_relu is bn_relu and sparsekern.FusedBNReLU is FusedBNReLU
