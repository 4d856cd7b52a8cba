"""Split LBI optimizer, support tracking, ranking, and pruning masks for keep-ratio tables.

The optimizer is checked step by step against a float64 reference written directly from the
three update equations of SCIENCE.md section 4, with fixed gradients.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sparsekern.regularize import (
    TABLE_KEEP_RATIOS,
    SplitLBI,
    apply_masks,
    keep_count,
    magnitude_masks,
    random_masks,
    slbi_masks,
)

# ---- float64 reference ----------------------------------------------------------------------


def ref_prox(v, mode):
    """kappa-free Prox of V: soft threshold at 1, or per-output-filter group shrink at 1."""
    if mode == "elementwise":
        return v.sign() * (v.abs() - 1).clamp_min(0)
    out = torch.zeros_like(v)
    for f in range(v.shape[0]):
        norm = math.sqrt(float((v[f] ** 2).sum()))
        if norm > 0:
            out[f] = v[f] * max(0.0, 1 - 1 / norm)
    return out


def ref_unit_support(gamma, mode):
    if mode == "elementwise":
        return gamma != 0
    return torch.tensor([bool((gamma[f] != 0).any()) for f in range(gamma.shape[0])])


def ref_slbi(w0, grads, lr, kappa, nu, mode, momentum=0.0, weight_decay=0.0):
    """The three equations, one step at a time, in float64; returns W, V, Gamma, entry steps."""
    w = w0.double().clone()
    v = torch.zeros_like(w)
    gamma = torch.zeros_like(w)
    buffer = None
    entry = torch.full(ref_unit_support(gamma, mode).shape, -1, dtype=torch.int64)
    for k, g in enumerate(grads, start=1):
        d = g.double() + weight_decay * w
        if momentum:
            buffer = d.clone() if buffer is None else momentum * buffer + d
            d = buffer
        w_old, gamma_old = w.clone(), gamma.clone()
        w = w_old - kappa * lr * (d + (w_old - gamma_old) / nu)
        v = v + (lr / nu) * (w_old - gamma_old)
        gamma = kappa * ref_prox(v, mode)
        support = ref_unit_support(gamma, mode)
        entry[(entry < 0) & support] = k
    return w, v, gamma, entry


class TinyLBINet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)
        self.fc = nn.Linear(5, 4)


# ---- the update -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fc_mode, conv_mode, momentum, weight_decay, kappa",
    [("elementwise", "filter", 0.0, 0.0, 1.0), ("group", "elementwise", 0.9, 0.01, 2.0)],
)
def test_matches_float64_reference_step_by_step(fc_mode, conv_mode, momentum, weight_decay, kappa):
    torch.manual_seed(0)
    net = TinyLBINet()
    g = torch.Generator().manual_seed(1)
    # Output units of very different sizes, so they enter the support at different steps.
    unit_scale = {"conv.weight": [2.0, 0.3, 0.1], "fc.weight": [2.0, 0.3, 0.1, 0.6]}
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
            if n in unit_scale:
                p.mul_(torch.tensor(unit_scale[n]).view(-1, *([1] * (p.dim() - 1))))
    grads = {n: [0.3 * torch.randn(p.shape, generator=g) for _ in range(5)] for n, p in net.named_parameters()}
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    lr, nu = 0.5, 0.8
    opt = SplitLBI(net.parameters(), lr=lr, kappa=kappa, nu=nu, momentum=momentum,
                   weight_decay=weight_decay, fc_mode=fc_mode, conv_mode=conv_mode)
    params = dict(net.named_parameters())
    for k in range(5):
        for n, p in params.items():
            p.grad = grads[n][k].clone()
        opt.step()
        for n, mode in (("conv.weight", conv_mode), ("fc.weight", fc_mode)):
            w, v, gamma, entry = ref_slbi(start[n], grads[n][: k + 1], lr, kappa, nu, mode, momentum, weight_decay)
            state = opt.state[params[n]]
            torch.testing.assert_close(params[n].detach().double(), w, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state["V"].double(), v, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state["Gamma"].double(), gamma, rtol=1e-5, atol=1e-5)
            assert torch.equal(state["entry_step"], entry), (n, k)
            assert torch.equal(opt.support(params[n]), ref_unit_support(gamma, mode))
    # The test only means something if the support grew during the 5 steps.
    for n in ("conv.weight", "fc.weight"):
        entries = opt.state[params[n]]["entry_step"]
        assert (entries > 1).any() and (entries >= 0).any()
    # Biases: plain SGD with the same momentum / weight decay (no kappa, no coupling).
    for n in ("conv.bias", "fc.bias"):
        b = start[n].clone().requires_grad_()
        sgd = torch.optim.SGD([b], lr=lr, momentum=momentum, weight_decay=weight_decay)
        for k in range(5):
            b.grad = grads[n][k].clone()
            sgd.step()
        torch.testing.assert_close(params[n].detach(), b.detach())


def test_entry_steps_and_epochs_hand_computed():
    """With grad = (Gamma - W)/nu, W stays fixed, so V_k = k*lr*w/nu until w enters:
    lr = 0.5, nu = 1 -> |V_k| > 1 first at k = 2 for |w| = 1.5, 4 for 0.6, 7 for 0.3, never
    (within 10 steps) for 0.1."""
    w0 = torch.tensor([[1.5, -0.6, 0.3, 0.1]])
    fc = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        fc.weight.copy_(w0)
    opt = SplitLBI(fc.parameters(), lr=0.5, kappa=1.0, nu=1.0)
    assert not opt.support(fc.weight).any()  # (creates the state: Gamma = 0)
    for step in range(1, 11):
        fc.weight.grad = opt.state[fc.weight]["Gamma"] - fc.weight.detach()
        opt.step()
        if step in (3, 6, 10):
            opt.record_epoch({3: 0, 6: 1, 10: 2}[step])
    assert torch.equal(fc.weight.detach(), w0)
    assert opt.state[fc.weight]["entry_step"].tolist() == [[2, 4, 7, -1]]
    assert opt.state[fc.weight]["entry_epoch"].tolist() == [[0, 1, 2, -1]]
    history = opt.support_history(fc.weight)
    assert [epoch for epoch, _ in history] == [0, 1, 2]
    assert [mask.tolist() for _, mask in history] == [
        [[True, False, False, False]], [[True, True, False, False]], [[True, True, True, False]]
    ]
    assert opt.state[fc.weight]["Gamma"][0, 1] < 0  # sign follows W
    assert opt.importance(fc.weight).tolist() == [0, 1, 2, 3]


def test_group_mode_entry_steps_hand_computed():
    """fc_mode="group": the same schedule by row norm (rows of norm 1.5, 0.6, 0.1)."""
    w0 = torch.tensor([[0.9, 1.2, 0.0], [0.36, 0.0, -0.48], [0.0, 0.06, 0.08]])
    fc = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        fc.weight.copy_(w0)
    opt = SplitLBI(fc.parameters(), lr=0.5, kappa=1.0, nu=1.0, fc_mode="group")
    assert not opt.support(fc.weight).any()
    for _ in range(6):
        fc.weight.grad = opt.state[fc.weight]["Gamma"] - fc.weight.detach()
        opt.step()
    assert opt.state[fc.weight]["entry_step"].tolist() == [2, 4, -1]
    assert opt.support(fc.weight).tolist() == [True, True, False]
    assert opt.unit_kind(fc.weight) == "filter"


def test_ranking_on_constructed_state():
    conv = nn.Conv2d(1, 6, (1, 2), bias=False)
    opt = SplitLBI(conv.parameters(), lr=0.1)
    opt.support(conv.weight)  # creates the state
    state = opt.state[conv.weight]
    gamma_norms = [0.5, 1.0, 0.0, 2.0, 1.0, 0.0]
    weight_norms = [1.0, 1.0, 5.0, 1.0, 3.0, 0.5]
    with torch.no_grad():
        state["entry_step"] = torch.tensor([3, 1, -1, 3, 1, -1])
        state["Gamma"].copy_(torch.tensor(gamma_norms).view(6, 1, 1, 1) * torch.tensor([0.6, 0.8]).view(1, 1, 1, 2))
        conv.weight.copy_(torch.tensor(weight_norms).view(6, 1, 1, 1) * torch.tensor([0.0, -1.0]).view(1, 1, 1, 2))
    # entry 1: filters 1, 4 tie on ||Gamma|| -> larger ||W|| (4) first; entry 3: larger ||Gamma||
    # (3) first; never entered: by ||W||.
    assert opt.importance(conv.weight).tolist() == [4, 1, 3, 0, 2, 5]
    mask = slbi_masks(opt, conv.weight, 0.5)  # keeps 3 filters
    assert mask.shape == conv.weight.shape
    assert mask.all(dim=(1, 2, 3)).tolist() == [False, True, False, True, True, False]


def test_elementwise_ranking():
    fc = nn.Linear(2, 2, bias=False)
    opt = SplitLBI(fc.parameters(), lr=0.1)
    opt.support(fc.weight)
    state = opt.state[fc.weight]
    with torch.no_grad():
        state["entry_step"] = torch.tensor([[2, -1], [1, 2]])
        state["Gamma"].copy_(torch.tensor([[0.5, 0.0], [0.1, -0.7]]))
        fc.weight.copy_(torch.tensor([[1.0, 9.0], [1.0, 1.0]]))
    assert opt.importance(fc.weight).tolist() == [2, 3, 0, 1]
    assert opt.unit_kind(fc.weight) == "weight"


def test_true_features_enter_first():
    """Sparse regression: the two features that generate y enter Gamma's support first."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    y = 3.0 * x[:, 2] - 2.0 * x[:, 7] + 0.1 * torch.randn(256, generator=g)
    fc = nn.Linear(10, 1, bias=False)
    nn.init.zeros_(fc.weight)
    opt = SplitLBI(fc.parameters(), lr=0.1, kappa=1.0, nu=10.0)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.mse_loss(fc(x).squeeze(1), y).backward()
        opt.step()
    assert set(opt.importance(fc.weight)[:2].tolist()) == {2, 7}
    assert opt.support(fc.weight)[0, [2, 7]].all()


def test_use_gamma_swaps_weights_and_restores():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = SplitLBI(net.parameters(), lr=0.05, nu=0.1)
    x = torch.randn(6, 1, 6, 6)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(4, 1, 3, 3, generator=g) * torch.tensor([3.0, 0.05, 2.0, 0.05]).view(4, 1, 1, 1))
        net[3].weight.copy_(torch.randn(3, 64, generator=g))
    for _ in range(3):
        opt.zero_grad()
        net(x).mean().backward()
        opt.step()
    conv_support, fc_support = opt.support(net[0].weight), opt.support(net[3].weight)
    assert 0 < conv_support.sum() < 4 and 0 < fc_support.sum() < fc_support.numel()
    original = [p.detach().clone() for p in net.parameters()]
    w_conv = net[0].weight.detach() * conv_support.view(4, 1, 1, 1)
    w_fc = net[3].weight.detach() * fc_support
    expected = nn.functional.linear(
        torch.relu(nn.functional.conv2d(x, w_conv, net[0].bias)).flatten(1), w_fc, net[3].bias
    )
    with opt.use_gamma():
        torch.testing.assert_close(net(x), expected)
        assert torch.equal(net[0].bias, original[1])  # biases are not masked
    for p, before in zip(net.parameters(), original):
        assert torch.equal(p, before)
    with pytest.raises(RuntimeError, match="boom"):
        with opt.use_gamma():
            raise RuntimeError("boom")
    for p, before in zip(net.parameters(), original):
        assert torch.equal(p, before)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    nets = [nn.Linear(6, 4), nn.Linear(6, 4)]
    nn.init.normal_(nets[0].weight, std=2.0)
    x = torch.randn(5, 6)
    first = SplitLBI(nets[0].parameters(), lr=0.02, nu=0.05, momentum=0.5)
    for _ in range(3):
        first.zero_grad()
        nets[0](x).pow(2).mean().backward()
        first.step()
    first.record_epoch(0)
    nets[1].load_state_dict(nets[0].state_dict())
    second = SplitLBI(nets[1].parameters(), lr=0.02, nu=0.05, momentum=0.5)
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as torch.save / torch.load would
    loaded = second.state[nets[1].weight]
    assert loaded["entry_step"].dtype == torch.int64 and loaded["lbi_step"].dtype == torch.int64
    assert loaded["support_history"][0][1].dtype == torch.bool
    for net, opt in zip(nets, (first, second)):
        for _ in range(2):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    assert torch.equal(nets[0].weight, nets[1].weight)
    entries = first.state[nets[0].weight]["entry_step"]
    assert torch.equal(entries, second.state[nets[1].weight]["entry_step"])
    assert (entries > 0).any()
    assert len(second.support_history(nets[1].weight)) == 1


def test_dense_param_group_and_errors():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    opt = SplitLBI([{"params": net[0].parameters()}, {"params": net[1].parameters(), "sparse": False}], lr=0.1)
    start = net[1].weight.detach().clone()
    net(torch.randn(2, 3)).sum().backward()
    grad = net[1].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(net[1].weight.detach(), start - 0.1 * grad)  # plain SGD
    assert "Gamma" not in opt.state[net[1].weight]
    with pytest.raises(ValueError, match="not a sparse"):
        opt.support(net[1].weight)
    with pytest.raises(ValueError, match="not a sparse"):
        opt.importance(net[0].bias)
    with pytest.raises(ValueError, match="not optimised"):
        opt.support(nn.Linear(2, 2).weight)
    with pytest.raises(ValueError, match="nu"):
        SplitLBI(net.parameters(), lr=0.1, nu=0.0)
    with pytest.raises(ValueError, match="lr"):
        SplitLBI(net.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="fc_mode"):
        SplitLBI(net.parameters(), lr=0.1, fc_mode="filter")
    with pytest.raises(ValueError, match="conv_mode"):
        SplitLBI(net.parameters(), lr=0.1, conv_mode="group")
    assert set(opt.prune_masks(0.5)) == {net[0].weight}


# ---- pruning masks ----------------------------------------------------------------------------


def test_keep_count_table():
    # LeNet-5 conv c5 has 120 filters: 7.5 rounds half up to 8, 3.756 -> 4, 1.884 -> 2.
    assert [keep_count(r, 120) for r in TABLE_KEEP_RATIOS] == [120, 60, 30, 15, 8, 4, 2]
    assert [keep_count(r, 20) for r in TABLE_KEEP_RATIOS] == [20, 10, 5, 3, 1, 1, 1]
    assert keep_count(0.0157, 10) == 1  # never zero
    for bad in (0.0, -0.5, 1.5, 50, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            keep_count(bad, 10)


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_filter_masks_keep_top_norms(p):
    w = torch.randn(20, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    norms = [float(w[f].double().abs().pow(p).sum() ** (1 / p)) for f in range(20)]
    for ratio in TABLE_KEEP_RATIOS:
        mask = magnitude_masks(w, ratio, "filter", p=p)
        k = keep_count(ratio, 20)
        kept = mask.all(dim=(1, 2, 3))
        assert torch.equal(mask, kept.view(20, 1, 1, 1).expand_as(w))  # whole filters only
        assert int(kept.sum()) == k
        assert set(torch.nonzero(kept).flatten().tolist()) == set(sorted(range(20), key=lambda f: -norms[f])[:k])


def test_magnitude_weight_masks_and_ties():
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(5))
    for ratio in TABLE_KEEP_RATIOS:
        mask = magnitude_masks(w, ratio, "weight")
        k = keep_count(ratio, 120)
        assert int(mask.sum()) == k
        assert w.abs()[mask].min() >= w.abs()[~mask].max() if k < 120 else mask.all()
    tied = torch.tensor([[1.0, -1.0, 1.0, 0.5]])
    assert magnitude_masks(tied, 0.5, "weight").tolist() == [[True, True, False, False]]  # lower index wins


def test_random_masks_counts_and_seeds():
    w = torch.zeros(20, 4)
    a, b, c = (random_masks(w, 0.5, "filter", seed=s) for s in (7, 7, 8))
    assert int(a.all(dim=1).sum()) == 10 and int(a.sum()) == 40
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(random_masks(w, 0.0313, "weight", seed=1).sum()) == keep_count(0.0313, 80)


def test_apply_masks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6, 4))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    conv_mask = magnitude_masks(net[0].weight, 0.25, "filter")
    fc_keep = torch.tensor([True, False, True, False])
    apply_masks(net, {"0.weight": conv_mask, "3.weight": fc_keep})
    params = dict(net.named_parameters())
    assert torch.equal(params["0.weight"], before["0.weight"] * conv_mask)
    assert torch.equal(params["3.weight"], before["3.weight"] * fc_keep.view(4, 1))
    assert torch.equal(params["0.bias"], before["0.bias"])
    assert int((params["0.weight"].flatten(1) != 0).any(dim=1).sum()) == keep_count(0.25, 6)
    with pytest.raises(KeyError, match="not a parameter"):
        apply_masks(net, {"conv.weight": conv_mask})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(net, {"3.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        apply_masks(net, {"3.weight": torch.ones(4, 6)})


# ---- CUDA: same numbers as on the CPU, and no host sync inside step() ------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fc_mode, conv_mode", [("elementwise", "filter"), ("group", "elementwise")])
def test_cuda_step_matches_cpu_without_host_sync(fc_mode, conv_mode):
    torch.manual_seed(0)
    cpu_net = TinyLBINet()
    with torch.no_grad():
        for p in cpu_net.parameters():
            p.mul_(4.0)
    gpu_net = copy.deepcopy(cpu_net).cuda()
    options = dict(lr=0.5, nu=0.8, momentum=0.9, weight_decay=0.01, fc_mode=fc_mode, conv_mode=conv_mode)
    cpu_opt, gpu_opt = SplitLBI(cpu_net.parameters(), **options), SplitLBI(gpu_net.parameters(), **options)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p, q in zip(cpu_net.parameters(), gpu_net.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.cuda()
        cpu_opt.step()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in step() raises
        try:
            gpu_opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for p, q in zip(cpu_net.parameters(), gpu_net.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-5)
    for name in ("conv", "fc"):
        p, q = getattr(cpu_net, name).weight, getattr(gpu_net, name).weight
        torch.testing.assert_close(gpu_opt.state[q]["Gamma"].cpu(), cpu_opt.state[p]["Gamma"], rtol=1e-5, atol=1e-5)
        assert torch.equal(gpu_opt.state[q]["entry_step"].cpu(), cpu_opt.state[p]["entry_step"])
        assert torch.equal(gpu_opt.importance(q).cpu(), cpu_opt.importance(p))
