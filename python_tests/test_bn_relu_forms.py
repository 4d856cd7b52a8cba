"""bn_relu's out= and in-place forms (write_dead), its torch.library ops under opcheck and
torch.compile(fullgraph=True), and whole-model fusion (fuse_bn_relu over torch.fx graphs:
torchvision ResNets, functional ReLUs, residual adds).

References are independent of the kernels: torch's own eval-mode BatchNorm + ReLU, and
bn_relu_reference (pure torch); float comparisons are scaled to the magnitude of the terms."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import channel_peaks, kind_params, prepare_kind, randomize_bn
from torch import nn

from sparsekern.ops.bn_relu import FusedBNReLU, bn_affine, bn_relu, bn_relu_reference, find_bn_relu_pairs, fuse_bn_relu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture
def backend_on(request):
    return prepare_kind(request.param)


def _case(c=21, dtype=torch.float32, layout="contiguous", seed=0, shape=(3, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((shape[0], c) + shape[1:], generator=g) * 2).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    scale = torch.randn(c, generator=g)
    shift = torch.randn(c, generator=g)
    dead = torch.zeros(c, dtype=torch.bool)
    dead[[0, 3, 8, 9, 10, 11, 12, 13, 14, 15, 20][: max(0, c - 10)]] = True  # whole 8-groups, mixed ones
    return x, scale, shift, dead


def _close(got, ref, dtype, x, scale, shift):
    """Within float32 rounding of the terms' magnitude (FMA vs mul + add), plus one dtype ulp of y."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mag = (x.double().cpu() * scale.double().cpu().reshape(shape)).abs() + shift.double().cpu().abs().reshape(shape)
    mag = torch.nan_to_num(mag, nan=0.0)
    ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    err = (got.double().cpu() - ref.double().cpu()).abs()
    assert bool((err <= 1e-6 * mag + ulp * ref.double().cpu().abs() + 1e-30).all()), float(err.max())


@pytest.mark.parametrize("backend_on", kind_params(), indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_out_and_inplace_forms_equal_the_functional_one(backend_on, layout, dtype):
    backend, device = backend_on
    x, scale, shift, dead = (t.to(device) for t in _case(dtype=dtype, layout=layout))
    x[:, dead] = float("nan")  # never read: NaN would show in y or m
    ref_y, ref_m = bn_relu_reference(x.cpu(), scale.cpu(), shift.cpu(), dead.cpu(), return_max=True)
    y, m = bn_relu(x, scale, shift, dead, return_max=True, backend=backend)
    _close(y, ref_y, dtype, x, scale, shift)
    assert torch.equal(m.cpu(), y.cpu().reshape(*m.shape, -1).amax(2).float())
    # out=: garbage in the buffer everywhere, write_dead=True overwrites all of it
    out = torch.full_like(x, 7.0)
    got, got_m = bn_relu(x, scale, shift, dead, return_max=True, backend=backend, out=out)
    assert got is out and torch.equal(out, y) and torch.equal(got_m, m)
    # write_dead=False: dead channels untouched (7 stays 7), live ones as before
    out = torch.full_like(x, 7.0)
    bn_relu(x, scale, shift, dead, backend=backend, out=out, write_dead=False)
    live = ~dead
    assert torch.equal(out[:, live], y[:, live])
    assert bool(((out[:, dead] == 7) | (out[:, dead] == 0)).all())  # mixed vectors may write their zeros
    # ... and into a buffer that holds 0 there, exactly the functional result
    out = torch.zeros_like(x)
    bn_relu(x, scale, shift, dead, backend=backend, out=out, write_dead=False)
    assert torch.equal(out, y)
    # in place
    xi = x.clone()
    got, got_m = bn_relu(xi, scale, shift, dead, return_max=True, backend=backend, inplace=True)
    assert got is xi and torch.equal(xi, y) and torch.equal(got_m, m)
    xi = x.clone()
    bn_relu(xi, scale, shift, dead, backend=backend, inplace=True, write_dead=False)
    assert torch.equal(xi[:, live], y[:, live])
    assert bool((torch.isnan(xi[:, dead]) | (xi[:, dead] == 0)).all())  # x's values or 0, never anything else


@pytest.mark.parametrize("backend_on", kind_params(["cpp", "torch", "cuda"]), indirect=True)
def test_out_of_another_layout_and_non_dense_x(backend_on):
    backend, device = backend_on
    x, scale, shift, dead = (t.to(device) for t in _case(layout="channels_last"))
    y = bn_relu(x, scale, shift, dead, backend=backend)
    out = torch.empty(x.shape, device=device).transpose(2, 3).contiguous().transpose(2, 3)  # neither layout
    bn_relu(x, scale, shift, dead, backend=backend, out=out)
    assert torch.equal(out, y)
    xs = torch.randn(3, 42, 5, 8, device=device)[:, ::2, :, :6]  # strided view
    out = torch.empty(xs.shape, device=device)
    bn_relu(xs, scale, shift, dead, backend=backend, out=out)
    assert torch.equal(out, bn_relu(xs, scale, shift, dead, backend=backend))
    x5 = torch.randn(2, 3, 4, 21, 5, device=device).permute(0, 3, 1, 2, 4)  # folds only through a copy
    ref = bn_relu_reference(x5, scale, shift, dead)
    x5i = x5.clone(memory_format=torch.preserve_format)
    bn_relu(x5i, scale, shift, dead, backend=backend, inplace=True)
    _close(x5i, ref, torch.float32, x5, scale, shift)


def test_forms_match_torch_batchnorm_relu_in_eval_mode():
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(16)), seed=3)[0].eval()
    x = torch.randn(4, 16, 9, 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = F.relu(bn(x))
        scale, shift = bn_affine(bn)
        out = torch.empty_like(x)
        bn_relu(x, scale, shift, out=out)
        xi = x.clone()
        bn_relu(xi, scale, shift, inplace=True)
    mag = (x * scale.reshape(1, -1, 1, 1)).abs() + shift.abs().reshape(1, -1, 1, 1)
    for got in (out, xi):
        assert bool(((got - expected).abs() <= 1e-5 * mag + 1e-7).all())


def test_form_arguments_are_checked():
    x, s, b = torch.randn(2, 4, 3), torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="out must match"):
        bn_relu(x, s, b, out=torch.empty(2, 4, 4))
    with pytest.raises(ValueError, match="out must match"):
        bn_relu(x, s, b, out=torch.empty(2, 4, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="not both"):
        bn_relu(x, s, b, out=torch.empty_like(x), inplace=True)
    with pytest.raises(ValueError, match="write_dead=False needs out= or inplace"):
        bn_relu(x, s, b, write_dead=False)
    xg = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        bn_relu(xg, s, b, backend="torch", out=torch.empty_like(x))
    assert bn_relu(x, s, b, out=x) is x  # out=x is the in-place form


# ---------------------------------------------------------------- torch.library ops

def _op_args(dead=True):
    x, scale, shift, dmask = _case(c=10, shape=(2, 4, 4))
    return x, scale.contiguous(), shift.contiguous(), (dmask.to(torch.uint8) if dead else None)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("with_dead", [True, False])
def test_opcheck(backend, with_dead):
    if backend == "cpp":
        prepare_kind("cpp")
    x, s, b, d = _op_args(with_dead)
    for return_max in (True, False):
        torch.library.opcheck(torch.ops.sparsekern.bn_relu.default, (x, s, b, d, return_max, backend))
        torch.library.opcheck(torch.ops.sparsekern.bn_relu_out.default,
                              (x, s, b, d, torch.empty_like(x), return_max, True, backend))
        torch.library.opcheck(torch.ops.sparsekern.bn_relu_.default, (x.clone(), s, b, d, return_max, True, backend))


def test_fused_module_under_torch_compile_fullgraph():
    prepare_kind("cpp")
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(12)), seed=5)[0].eval()
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 5]] = True
    net = nn.Sequential(nn.Conv2d(3, 12, 3), FusedBNReLU.from_bn(bn, dead_mask=dead, record_max=True)).eval()
    x = torch.randn(2, 3, 10, 10)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = net(x)
        expected_max = net[1].last_max.clone()
        explained = torch._dynamo.explain(net)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
        got = compiled(x)
    assert torch.equal(got, expected) and torch.equal(net[1].last_max, expected_max)

    def step(t, out):  # the out= and in-place forms compile too
        y, m = bn_relu(t, net[1].scale, net[1].shift, dead, return_max=True, out=out, write_dead=False)
        z = bn_relu(t.clone(), net[1].scale, net[1].shift, inplace=True)
        return y, m, z

    t = torch.randn(2, 12, 6, 6)
    ref = step(t, torch.zeros_like(t))
    with torch.no_grad():
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(t, torch.zeros_like(t))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- whole-model fusion

def _bn_relu_edges(gm: torch.fx.GraphModule) -> int:
    """An independent count: BN module calls whose only user is a ReLU of them, read straight off the graph."""
    mods = dict(gm.named_modules())
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.modules.batchnorm._BatchNorm):
            users = list(node.users)
            if len(users) == 1 and (users[0].target in (torch.relu, F.relu) or users[0].op == "call_module"
                                    and isinstance(mods[users[0].target], nn.ReLU)):
                count += 1
    return count


@pytest.mark.parametrize("arch, blocks, per_block", [("resnet18", 8, 1), ("resnet50", 16, 2)])
def test_fuse_torchvision_resnet(arch, blocks, per_block):
    tv = pytest.importorskip("torchvision")
    model = randomize_bn(getattr(tv.models, arch)(), seed=11).eval()
    edges = _bn_relu_edges(torch.fx.symbolic_trace(model))
    # the stem's bn1 -> relu plus per block bn1 (and bn2 in a Bottleneck) -> relu; the last BN of each
    # block feeds the residual add and is not fusable with the ReLU after it
    assert edges == 1 + blocks * per_block
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = model(x)
    fused = fuse_bn_relu(copy.deepcopy(model))
    n_fused = sum(isinstance(m, FusedBNReLU) for m in fused.modules())
    assert n_fused == edges
    assert find_bn_relu_pairs(fused.graph, dict(fused.named_modules())) == []
    remaining = [n for n in fused.graph.nodes if n.op == "call_module" and isinstance(fused.get_submodule(n.target), nn.ReLU)]
    assert len(remaining) == blocks  # one ReLU after each residual add
    with torch.no_grad():
        got = fused(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_fused_model_statistics_equal_hooks_on_the_unfused_model():
    tv = pytest.importorskip("torchvision")
    from sparsekern.stats.features import find_features
    from sparsekern.stats.tracker import SparsityTracker

    model = randomize_bn(tv.models.resnet18(), seed=13).eval()
    batches = [torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    pairs = find_bn_relu_pairs(torch.fx.symbolic_trace(model).graph, dict(model.named_modules()))
    names = [bn.target for bn, _ in pairs]
    # reference: hooks on the unfused BNs; relu(max) = max(relu) since relu is monotonic
    peaks = {k: v.clamp_min(0) for k, v in channel_peaks(model, names, batches).items()}
    seen: dict = {}
    fused = fuse_bn_relu(copy.deepcopy(model), record_max=True)
    for name in names:  # the max epilogue, per module
        mod = fused.get_submodule(name)
        mod.on_max = lambda m, name=name: seen.__setitem__(name, torch.maximum(seen[name], m.amax(0))
                                                            if name in seen else m.amax(0))
    features = {f.name: f for f in find_features(fused)}
    assert set(names) <= set(features), "every FusedBNReLU is a feature of the fused model"
    tracker = SparsityTracker(fused, selectivity="none")
    with torch.no_grad():
        for xb in batches:
            fused(xb)
    for name in names:
        ref = peaks[name]
        tol = 1e-5 * ref.abs().max().item() + 1e-6
        assert torch.allclose(seen[name], ref, rtol=1e-5, atol=tol), name
        assert torch.equal(tracker.stats[name].corpus_max, seen[name]), name  # the tracker reads the same y
    tracker.close() if hasattr(tracker, "close") else None
