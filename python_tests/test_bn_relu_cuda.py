"""bn_relu on a GPU (skipped without one): the CUDA and compiled-Triton kernels over the shapes
ResNet runs (7x7x2048, 112x112x64, 14x14 in half: the run lengths that are not a multiple of the
vector width), fp32/fp16/bf16, NCHW and channels_last, dead masks, NaN / -0 / subnormals, and the
out= / in-place forms. References: bn_relu_reference (pure torch, same device) and torch's own
eval-mode BatchNorm + ReLU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import prepare_kind

from sparsekern.ops.bn_relu import bn_relu, bn_relu_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

KINDS = ["cuda", "triton-cuda"]
SHAPES = [(2, 2048, 7, 7), (2, 64, 112, 112), (4, 256, 14, 14), (3, 97, 5, 3), (8, 512, 1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _params(c, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale, shift = torch.randn(c, generator=g), torch.randn(c, generator=g)
    dead = torch.rand(c, generator=g) < 0.4
    return scale.to(device), shift.to(device), dead.to(device)


def _check(y, m, x, scale, shift, dead):
    ref_y, _ = bn_relu_reference(x, scale, shift, dead, return_max=True)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mag = torch.nan_to_num((x.double() * scale.double().reshape(shape)).abs() + shift.double().abs().reshape(shape))
    ulp = 0.0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps
    err = (y.double() - ref_y.double()).abs()
    both_nan = torch.isnan(y) & torch.isnan(ref_y)
    assert bool(((err <= 1e-6 * mag + ulp * ref_y.double().abs()) | both_nan).all())
    assert torch.equal(torch.isnan(y), torch.isnan(ref_y))
    flat = y.reshape(y.shape[0], y.shape[1], -1).float()
    nan_nc = torch.isnan(flat).any(2)
    assert torch.equal(torch.isnan(m), nan_nc)
    assert torch.equal(m[~nan_nc], flat.amax(2)[~nan_nc])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_resnet_shapes(kind, shape, dtype, layout):
    backend, device = prepare_kind(kind)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    scale, shift, dead = _params(shape[1], device)
    for d in (None, dead):
        y, m = bn_relu(x, scale, shift, d, return_max=True, backend=backend)
        _check(y, m, x, scale, shift, d)
        out = torch.zeros_like(x)
        y2, m2 = bn_relu(x, scale, shift, d, return_max=True, backend=backend, out=out, write_dead=False)
        assert torch.equal(y2, y) and torch.equal(m2, m)
        xi = x.clone()
        bn_relu(xi, scale, shift, d, backend=backend, inplace=True)
        assert torch.equal(xi, y)
    # offset views: runs that start unaligned (the vector body's scalar head)
    xo = torch.randn(shape[0] * shape[1] * shape[2] * shape[3] + 3, device=device).to(dtype)[3:].view(shape)
    y, m = bn_relu(xo, scale, shift, dead, return_max=True, backend=backend)
    _check(y, m, xo, scale, shift, dead)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_nan_negative_zero_and_subnormals_as_torch(kind, dtype):
    """No flush-to-zero: a subnormal input times 1 stays subnormal, as torch computes it."""
    backend, device = prepare_kind(kind)
    c = 16
    tiny = torch.finfo(dtype).tiny
    vals = torch.tensor([float("nan"), -0.0, 0.0, tiny / 4, -tiny / 4, tiny, 1.0, -1.0], dtype=torch.float32)
    x = vals.repeat(2 * c * 7 * 7 // vals.numel() + 1)[: 2 * c * 7 * 7].reshape(2, c, 7, 7).to(device, dtype)
    scale, shift = torch.ones(c, device=device), torch.zeros(c, device=device)
    y, m = bn_relu(x, scale, shift, return_max=True, backend=backend)
    expected = torch.relu(x.float()).to(dtype)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    ok = ~torch.isnan(expected)
    assert torch.equal(y[ok].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected[ok].view(torch.int16 if dtype != torch.float32 else torch.int32)), "-0 -> +0, subnormals kept"
    sub = x.float().abs() < tiny
    assert bool((y.float()[sub & (x.float() > 0)] > 0).all())


@pytest.mark.parametrize("kind", KINDS)
def test_against_torch_batchnorm_relu(kind):
    backend, device = prepare_kind(kind)
    bn = torch.nn.BatchNorm2d(2048).eval().to(device)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
        x = torch.randn(4, 2048, 7, 7, device=device)
        from sparsekern.ops.bn_relu import bn_affine

        scale, shift = bn_affine(bn)
        y = bn_relu(x, scale, shift, backend=backend)
        expected = F.relu(bn(x))
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
