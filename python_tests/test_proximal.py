"""Prox operators, weight grouping and the prox regularisers (CGES, lasso, group lasso, ridge).

Every operator is checked against its closed form evaluated in float64 by plain Python loops
over the groups (the independent reference), on constructed groups that hit each case: all
zero, partly shrunk, entirely zeroed, negative weights, and the lr*lambda = 0 identity.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsekern.regularize import (
    CGES,
    GroupLasso,
    Lasso,
    NoRegularizer,
    Ridge,
    cges_prox,
    exclusive_lasso_prox,
    group_lasso_prox,
    group_rows,
    make_regularizer,
    mu_ramp,
    ridge_prox,
    soft_threshold,
    sparse_weights,
    write_rows_back,
)

# ---- float64 references: one group at a time, straight from the formulas --------------------


def ref_group_prox(rows, t):
    out = []
    for row in rows.double().tolist():
        norm = math.sqrt(sum(w * w for w in row))
        scale = max(0.0, 1.0 - t / norm) if norm > 0 else 0.0
        out.append([scale * w for w in row])
    return torch.tensor(out, dtype=torch.float64)


def ref_exclusive_prox(rows, t):
    out = []
    for row in rows.double().tolist():
        level = t * sum(abs(w) for w in row)
        out.append([math.copysign(max(0.0, abs(w) - level), w) if w != 0 else 0.0 for w in row])
    return torch.tensor(out, dtype=torch.float64)


def ref_soft(x, t):
    flat = [math.copysign(max(0.0, abs(w) - t), w) if w != 0 else 0.0 for w in x.double().flatten().tolist()]
    return torch.tensor(flat, dtype=torch.float64).view(x.shape)


def ref_input_groups(weight):
    """Naive loop: for a conv weight (out, in, kh, kw), the group of (i, y, x) is w[:, i, y, x]."""
    out_ch, in_ch, kh, kw = weight.shape
    return [weight[:, i, y, x] for i in range(in_ch) for y in range(kh) for x in range(kw)]


# Rows hitting every case at threshold 1: all-zero, partly shrunk (norm 5 -> scale 0.8),
# entirely zeroed (norm 0.5), exactly at the threshold (norm 1 -> 0), negative, one big entry.
CASE_ROWS = [
    [0.0, 0.0, 0.0, 0.0],
    [3.0, -4.0, 0.0, 0.0],
    [0.3, -0.4, 0.0, 0.0],
    [0.0, -1.0, 0.0, 0.0],
    [-2.0, -1.0, -2.0, -4.0],
    [0.0, 0.0, 7.5, 0.0],
]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


# ---- the operators ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_group_prox_constructed_cases(dtype):
    rows = torch.tensor(CASE_ROWS, dtype=dtype)
    out = group_lasso_prox(rows, 1.0)
    assert out.dtype == dtype
    close(out, ref_group_prox(rows, 1.0), dtype)
    assert torch.equal(out[0], torch.zeros(4, dtype=dtype)) and not out.isnan().any()
    assert (out[2] == 0).all() and (out[3] == 0).all()  # zeroed groups are exactly 0
    close(out[1], torch.tensor([2.4, -3.2, 0.0, 0.0], dtype=torch.float64), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (97, 13)])
def test_group_prox_random(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    rows = torch.randn(shape, generator=g, dtype=dtype)
    for t in (0.05, 0.5, 3.0):
        close(group_lasso_prox(rows, t), ref_group_prox(rows, t), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_exclusive_prox_constructed_cases(dtype):
    rows = torch.tensor(
        [[3.0, -1.0, 0.5, 0.0],     # l1 4.5, level 0.45 at t=0.1: partly shrunk, sign kept
         [0.0, 0.0, 0.0, 0.0],      # all zero stays zero
         [-4.0, 4.0, 4.0, -4.0],    # level 1.6: all shrunk equally, signs kept
         [0.1, -0.1, 0.05, 10.0]],  # level ~1.0: small ones zeroed, the big one survives
        dtype=dtype,
    )
    out = exclusive_lasso_prox(rows, 0.1)
    close(out, ref_exclusive_prox(rows, 0.1), dtype)
    assert (out[3, :3] == 0).all() and out[3, 3] > 0
    # A group whose every |w| <= t*||w||_1 disappears entirely: [1, 1] at t=0.5 -> level 1.
    assert torch.equal(exclusive_lasso_prox(torch.tensor([[1.0, -1.0]], dtype=dtype), 0.5),
                       torch.zeros(1, 2, dtype=dtype))


@pytest.mark.parametrize("shape", [(1, 5), (9, 4), (64, 33)])
def test_exclusive_prox_random(shape):
    rows = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for t in (0.001, 0.05, 1.0):
        close(exclusive_lasso_prox(rows, t), ref_exclusive_prox(rows, t), torch.float64)


def test_soft_threshold_and_ridge():
    x = torch.tensor([[-2.0, -0.5, 0.0], [0.25, 0.5, 3.0]])
    close(soft_threshold(x, 0.5), ref_soft(x, 0.5), torch.float32)
    assert torch.equal(soft_threshold(x, 0.5)[0, 1:], torch.zeros(2))
    x4 = torch.randn(3, 2, 3, 3, dtype=torch.float64)  # any shape
    close(soft_threshold(x4, 0.7), ref_soft(x4, 0.7), torch.float64)
    close(ridge_prox(x4, 0.25), x4.double() / 1.25, torch.float64)


def test_zero_threshold_is_identity():
    rows = torch.tensor(CASE_ROWS)
    for op in (group_lasso_prox, exclusive_lasso_prox, soft_threshold, ridge_prox):
        assert torch.equal(op(rows, 0.0), rows), op.__name__
    assert torch.equal(cges_prox(rows, 0.0, mu=0.3), rows)


def test_inplace_writes_through_a_weight_view():
    weight = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    expected = ref_group_prox(weight.reshape(4, -1).t(), 0.4)
    rows = group_rows(weight, "input")
    out = group_lasso_prox(rows, 0.4, inplace=True)
    assert out is rows
    close(weight.reshape(4, -1).t(), expected, torch.float64)
    expected = ref_exclusive_prox(weight.reshape(4, -1), 0.05)
    exclusive_lasso_prox(group_rows(weight, "filter"), 0.05, inplace=True)
    close(weight.reshape(4, -1), expected, torch.float64)


def test_tensor_threshold_equals_number():
    rows = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.3)
    for op in (group_lasso_prox, exclusive_lasso_prox, soft_threshold, ridge_prox):
        torch.testing.assert_close(op(rows, t), op(rows, 0.3), rtol=1e-6, atol=1e-6)


def test_cges_prox_is_group_then_exclusive_with_mu_split():
    rows = torch.tensor([[1.0, 0.2, -0.1], [0.5, 0.5, 0.5], [0.05, -0.02, 0.0]], dtype=torch.float64)
    t, mu = 0.4, 0.75
    expected = ref_exclusive_prox(ref_group_prox(rows, t * mu), t * (1 - mu))
    close(cges_prox(rows, t, mu), expected, torch.float64)
    # The order matters here: exclusive first then group gives a different answer.
    other = ref_group_prox(ref_exclusive_prox(rows, t * (1 - mu)), t * mu)
    assert not torch.allclose(expected, other)
    # mu = 1 is pure group sparsity, mu = 0 pure exclusive sparsity.
    close(cges_prox(rows, t, 1.0), ref_group_prox(rows, t), torch.float64)
    close(cges_prox(rows, t, 0.0), ref_exclusive_prox(rows, t), torch.float64)


def test_bad_inputs_raise_clear_errors():
    rows = torch.randn(3, 4)
    with pytest.raises(ValueError, match="threshold"):
        group_lasso_prox(rows, -0.1)
    with pytest.raises(ValueError, match="threshold"):
        exclusive_lasso_prox(rows, float("nan"))
    with pytest.raises(ValueError, match="2-D"):
        group_lasso_prox(torch.randn(4), 0.1)
    with pytest.raises(TypeError, match="floating"):
        exclusive_lasso_prox(torch.ones(2, 2, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="mu"):
        cges_prox(rows, 0.1, mu=1.5)
    with pytest.raises(ValueError, match="0-dim"):
        soft_threshold(rows, torch.ones(2))


# ---- grouping ---------------------------------------------------------------------------------


def test_conv_input_groups_equal_naive_loop():
    weight = torch.randn(5, 3, 2, 3, generator=torch.Generator().manual_seed(0))
    rows = group_rows(weight, "input")
    naive = ref_input_groups(weight)
    assert rows.shape == (3 * 2 * 3, 5)
    for j, group in enumerate(naive):
        assert torch.equal(rows[j], group)
    filters = group_rows(weight, "filter")
    assert torch.equal(group_rows(weight, "output"), filters)
    for o in range(5):
        assert torch.equal(filters[o], weight[o].flatten())
    # The vectorised prox over all groups equals the prox applied group by group.
    vectorised = group_lasso_prox(rows, 0.8).double()
    for j, group in enumerate(naive):
        close(vectorised[j], ref_group_prox(group[None], 0.8)[0], torch.float32)


def test_linear_groups():
    weight = torch.arange(12.0).view(3, 4)  # (out, in)
    assert torch.equal(group_rows(weight, "input"), weight.t())   # one input unit's outgoing weights
    assert torch.equal(group_rows(weight, "output"), weight)      # one output unit
    with pytest.raises(ValueError, match="group kind"):
        group_rows(weight, "column")
    with pytest.raises(ValueError, match="BatchNorm"):
        group_rows(torch.ones(4), "input")


def test_channels_last_weight_is_written_back():
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    expected = ref_group_prox(weight.reshape(4, -1).t(), 0.5)
    rows = group_rows(weight, "input")
    group_lasso_prox(rows, 0.5, inplace=True)
    write_rows_back(weight, rows, "input")
    close(weight.reshape(4, -1).t(), expected, torch.float64)


# ---- regularisers on models ------------------------------------------------------------------


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2 and a Linear head: biases and BN must never be touched."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


WEIGHTS = ("conv1.weight", "conv2.weight", "fc.weight")


def make_net(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 2, 4, 4, generator=g), torch.randint(0, 5, (8,), generator=g)


def ref_cges_layer(weight, t, mu, kind="input"):
    rows = group_rows(weight.detach().double(), kind)
    return ref_exclusive_prox(ref_group_prox(rows, t * mu), t * (1 - mu))


def test_mu_ramp():
    assert mu_ramp(4) == pytest.approx([0.8, 0.6, 0.4, 0.2])  # the reference code's schedule
    assert mu_ramp(1) == [0.8]
    assert mu_ramp(3, 1.0, 0.0) == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(ValueError):
        mu_ramp(3, 1.2, 0.0)
    with pytest.raises(ValueError):
        mu_ramp(0)


def test_cges_step_matches_per_layer_reference():
    net = make_net()
    reg = CGES(net, lam=0.5)
    assert reg.names == list(WEIGHTS)
    assert reg.mus == pytest.approx([0.8, 0.5, 0.2])
    params = dict(net.named_parameters())
    lr = 0.6
    expected = {n: ref_cges_layer(params[n], lr * 0.5, mu) for n, mu in zip(WEIGHTS, reg.mus)}
    reg.step(lr)
    for name in WEIGHTS:
        close(group_rows(params[name].detach(), "input"), expected[name], torch.float32)
    # Strong enough to zero some groups, not all.
    assert all(0 < layer["groups"] < 1 for layer in reg.sparsity().values())


def test_cges_filter_groups_and_explicit_mus():
    net = make_net(1)
    reg = CGES(net, lam=2.0, mu_schedule=[0.9, 0.1, 0.5], group_kind="filter")
    params = dict(net.named_parameters())
    expected = {n: ref_cges_layer(params[n], 0.1 * 2.0, mu, "filter") for n, mu in zip(WEIGHTS, [0.9, 0.1, 0.5])}
    reg.step(0.1)
    for name in WEIGHTS:
        close(group_rows(params[name].detach(), "filter"), expected[name], torch.float32)


@pytest.mark.parametrize("kind", ["cges", "lasso", "group-lasso", "ridge", "none"])
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
def test_regularizers_with_optimizers_touch_only_weights(kind, optimizer_cls):
    net = make_net()
    opt = optimizer_cls(net.parameters(), lr=0.05)
    reg = make_regularizer(kind, net, 0.2, optimizer=opt)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        reg.step()  # lr read from the optimizer
        for name, p in net.named_parameters():
            if name not in WEIGHTS:
                assert torch.equal(p, before[name]), f"{kind} changed {name}"
        expected = {
            "cges": lambda n, w: ref_cges_layer(w, 0.05 * 0.2, reg.mus[WEIGHTS.index(n)]),
            "lasso": lambda n, w: group_rows(ref_soft(w, 0.05 * 0.2), "input"),
            "group-lasso": lambda n, w: ref_group_prox(group_rows(w.double(), "filter"), 0.05 * 0.2),
            "ridge": lambda n, w: group_rows(w.double() / (1 + 0.05 * 0.2), "input"),
            "none": lambda n, w: group_rows(w.double(), "input"),
        }[kind]
        kind_rows = "filter" if kind == "group-lasso" else "input"
        for name in WEIGHTS:
            actual = group_rows(dict(net.named_parameters())[name].detach(), kind_rows)
            close(actual, expected(name, before[name]), torch.float32)


def test_lr_from_each_param_group():
    net = make_net()
    opt = torch.optim.SGD(
        [{"params": [net.conv1.weight], "lr": 0.5}, {"params": [net.conv2.weight, net.fc.weight], "lr": 0.01}],
        lr=0.1,
    )
    w1, w2 = net.conv1.weight.detach().clone(), net.conv2.weight.detach().clone()
    Lasso(net, 0.4, layers=["conv1", "conv2.weight"]).step(opt)
    close(net.conv1.weight.detach(), ref_soft(w1, 0.5 * 0.4), torch.float32)
    close(net.conv2.weight.detach(), ref_soft(w2, 0.01 * 0.4), torch.float32)
    # A tensor lr gives the same as the number.
    a, b = make_net(2), make_net(2)
    CGES(a, 0.3).step(torch.tensor(0.2))
    CGES(b, 0.3).step(0.2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


def test_parameter_list_skips_biases_and_bn():
    net = make_net()
    names = [n for n, _ in sparse_weights(list(net.parameters()))]
    assert len(names) == 3  # the three weights with >= 2 dims
    reg = GroupLasso(net.parameters(), 1e3)  # huge: every filter goes to zero
    bias = net.conv1.bias.detach().clone()
    reg.step(1.0)
    assert all(v["filters"] == 1.0 for v in reg.sparsity().values())
    assert torch.equal(net.conv1.bias, bias)


def test_sparsity_report_hand_computed():
    net = nn.Sequential(nn.Conv2d(2, 3, (1, 2), bias=False))
    w = torch.tensor(
        [[[[1.0, 0.0]], [[0.0, 0.0]]],    # filter 0: one nonzero
         [[[0.0, 0.0]], [[0.0, 0.0]]],    # filter 1: all zero
         [[[2.0, 0.0]], [[3.0, 0.0]]]]    # filter 2
    )
    with torch.no_grad():
        net[0].weight.copy_(w)
    report = NoRegularizer(net).sparsity()["0.weight"]
    # 12 weights, 9 zero; input groups (in, kx) = 4 columns, only (0, 1) and (1, 1) all zero.
    assert report == {"weights": pytest.approx(9 / 12), "groups": pytest.approx(2 / 4), "filters": pytest.approx(1 / 3)}
    assert GroupLasso(net, 1.0).sparsity()["0.weight"]["groups"] == pytest.approx(1 / 3)  # filter groups


def test_penalties_equal_float64_formulas():
    net = make_net()
    ws = [dict(net.named_parameters())[n].detach().double() for n in WEIGHTS]
    lam = 0.7
    torch.testing.assert_close(Lasso(net, lam).penalty().double(), lam * sum(w.abs().sum() for w in ws))
    torch.testing.assert_close(Ridge(net, lam).penalty().double(), 0.5 * lam * sum(w.pow(2).sum() for w in ws))
    gl = lam * sum(sum(r.norm() for r in w.reshape(w.shape[0], -1)) for w in ws)
    torch.testing.assert_close(GroupLasso(net, lam).penalty().double(), gl)
    cges = CGES(net, lam)
    expected = 0.0
    for w, mu in zip(ws, cges.mus):
        cols = [g.double() for g in (ref_input_groups(w) if w.dim() == 4 else list(w.t()))]
        expected += lam * (mu * sum(g.norm() for g in cols) + (1 - mu) * 0.5 * sum(g.abs().sum() ** 2 for g in cols))
    torch.testing.assert_close(cges.penalty().double(), expected)
    # Differentiable: the lasso penalty's gradient is lam * sign(w).
    Lasso(net, lam).penalty().backward()
    torch.testing.assert_close(net.fc.weight.grad, lam * net.fc.weight.detach().sign())


def test_regularizer_errors():
    net = make_net()
    with pytest.raises(ValueError, match="unknown regulariser"):
        make_regularizer("elastic", net, 0.1)
    with pytest.raises(ValueError, match="strength"):
        Lasso(net, -1.0)
    with pytest.raises(ValueError, match="strength"):
        CGES(net, float("nan"))
    with pytest.raises(ValueError, match="no Linear/Conv"):
        CGES(net, 0.1, layers=["bn1"])
    with pytest.raises(ValueError, match="mu_schedule"):
        CGES(net, 0.1, mu_schedule=[0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="mu"):
        CGES(net, 0.1, mu_schedule=(1.5, 0.2))
    with pytest.raises(ValueError, match="grouped convolution"):
        CGES(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), 0.1)
    reg = Lasso(net, 0.1)
    with pytest.raises(ValueError, match="learning rate"):
        reg.step()
    with pytest.raises(ValueError, match="lr"):
        reg.step(-0.1)
    with pytest.raises(ValueError, match="not optimised"):
        reg.step(torch.optim.SGD([net.conv1.weight], lr=0.1))


def test_cges_training_makes_groups_sparse():
    """End to end: SGD + CGES on a small problem zeroes input groups while learning."""
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    reg = make_regularizer("cges", net, 0.5, optimizer=opt)
    plain = make_net()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    x, y = batch(1)
    for _ in range(40):
        for model, optimizer in ((net, opt), (plain, plain_opt)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        reg.step()
    report = reg.sparsity()
    assert report["fc.weight"]["groups"] > 0.1 and report["fc.weight"]["weights"] > 0.3
    plain_report = NoRegularizer(plain).sparsity()["fc.weight"]
    assert plain_report["groups"] == 0.0 and plain_report["weights"] < 0.01
    assert nn.functional.cross_entropy(net(x), y) < math.log(5)  # still learned something


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["cges", "lasso", "group-lasso", "ridge"])
def test_cuda_step_matches_cpu_without_host_sync(kind):
    cpu_net = make_net()
    gpu_net = make_net().cuda()
    cpu_reg, gpu_reg = make_regularizer(kind, cpu_net, 0.5), make_regularizer(kind, gpu_net, 0.5)
    gpu_lr = torch.tensor(0.6, device="cuda")  # a device-side lr must not be read back either
    torch.cuda.set_sync_debug_mode("error")  # any host sync in step() raises
    try:
        gpu_reg.step(gpu_lr)
        gpu_reg.step(0.6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_reg.step(0.6)
    cpu_reg.step(0.6)
    for p, q in zip(cpu_net.parameters(), gpu_net.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6)
